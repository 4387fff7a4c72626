"""Patient-level train/val/test splits: a seeded shuffle, or a manifest that fixes them."""

from __future__ import annotations

import csv
import io

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.5, 0.2, 0.3)


def parse_manifest(uri: str, data: bytes) -> dict[str, str]:
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
    header = [cell.strip() for cell in next(reader, [])]
    if header[:2] != ["case_id", "split"]:
        raise ValueError(f"{uri}: first line is {header!r}; expected the header 'case_id,split'")
    splits = {}
    for line_number, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or row[1].strip() not in SPLITS:
            raise ValueError(f"{uri} line {line_number}: {row!r}; expected "
                             f"'case_id,split' with split one of {', '.join(SPLITS)}")
        splits[row[0].strip()] = row[1].strip()
    return splits


def assign_splits(cases: list, seed: int, fractions=DEFAULT_SPLIT_FRACTIONS) -> None:
    """Seeded patient-level split of the usable cases: one patient's cases share a split.

    Args:
        cases: objects with ``case_id``, ``status``, ``patient_group`` and a writable ``split``.
        seed: seed of the shuffle of patient groups.
        fractions: train/val/test fractions summing to 1.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    usable = [case for case in cases if case.status == "ok"]
    groups: dict[str, list] = {}
    for case in sorted(usable, key=lambda c: c.case_id):
        groups.setdefault(case.patient_group or case.case_id, []).append(case)
    # Ordered by their first case ID, not by the patient hash: the hash depends on the dataset's
    # identity key, and the split must depend only on the cases and the seed.
    keys = sorted(groups, key=lambda group: groups[group][0].case_id)
    order = np.random.default_rng(seed).permutation(len(keys))
    train, val = round(fractions[0] * len(usable)), round(fractions[1] * len(usable))
    targets = np.asarray([train, val, len(usable) - train - val])
    counts = np.zeros(3, dtype=int)
    for position in order:
        members = groups[keys[position]]
        slot = int(np.argmax(targets - counts))  # the split furthest below its target
        counts[slot] += len(members)
        for case in members:
            case.split = SPLITS[slot]
