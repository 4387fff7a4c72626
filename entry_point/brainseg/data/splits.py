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


FOLD_STREAM = 7  # the second key of the fold shuffle's generator: independent of the split's


def _patients(groups: dict[str, str]) -> dict[str, list[str]]:
    """``{patient group: [case_id, ...]}``, ordered by each group's first case ID (not by the patient
    hash, which depends on the dataset's identity key: the order must depend on the cases alone)."""
    members: dict[str, list[str]] = {}
    for case_id in sorted(groups):
        members.setdefault(groups[case_id] or case_id, []).append(case_id)
    return dict(sorted(members.items(), key=lambda item: item[1][0]))


def assign_folds(groups: dict[str, str], folds: int, seed: int, strata: dict[str, str] | None = None) -> dict[str, int]:
    """Seeded patient-level cross-validation folds: ``{case_id: fold}`` (0-based), every patient's
    cases in one fold, the patients dealt in shuffled order to the fold with the fewest cases.
    With ``strata`` (``{case_id: stratum}``, e.g. with tumour, tumour-free) each stratum is dealt
    in turn to the fold with the fewest cases of that stratum (then the fewest cases), so every
    fold gets its share of each; a patient goes with the stratum of its first case. One stratum
    deals as without it.

    Raises:
        ValueError: fewer patients than folds.
    """
    members = _patients(groups)
    if len(members) < folds:
        raise ValueError(f"{len(members)} patient(s) among the {len(groups)} training and validation case(s) "
                         f"cannot fill {folds} folds; lower --folds or add cases")
    keys = list(members)
    stratum_of = {key: (strata or {}).get(cases[0], "") for key, cases in members.items()}
    counts = np.zeros(folds, dtype=int)
    shuffled = [keys[position] for position in np.random.default_rng([seed, FOLD_STREAM]).permutation(len(keys))]
    assigned = {}
    for stratum in sorted(set(stratum_of.values())):
        in_stratum = np.zeros(folds, dtype=int)
        for key in (key for key in shuffled if stratum_of[key] == stratum):
            fold = int(np.lexsort((counts, in_stratum))[0])  # fewest of the stratum, then fewest in all
            in_stratum[fold] += len(members[key])
            counts[fold] += len(members[key])
            assigned.update((case_id, fold) for case_id in members[key])
    return assigned


def assign_splits(groups: dict[str, str], seed: int, fractions=DEFAULT_SPLIT_FRACTIONS,
                  strata: dict[str, str] | None = None) -> dict[str, str]:
    """Seeded patient-level split of the usable cases: one patient's cases share a split.

    Args:
        groups: ``{case_id: patient group}`` of the usable cases (an empty group: the case alone).
        seed: seed of the shuffle of patient groups.
        fractions: train/val/test fractions summing to 1.
        strata: ``{case_id: stratum}`` (e.g. with tumour, tumour-free); when it holds more than one
            stratum each is split on its own, so every split gets its share of each (by largest
            remainders; a patient's cases go with the stratum of the first). One stratum splits as
            without it.

    Returns:
        ``{case_id: split}``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    members = _patients(groups)
    if strata and len({strata[case_id] for case_id in groups}) > 1:
        parts: dict[str, dict[str, str]] = {}
        for cases in members.values():
            parts.setdefault(strata[cases[0]], {}).update((case_id, groups[case_id]) for case_id in cases)
        return {case_id: split for name in sorted(parts)
                for case_id, split in _deal(_patients(parts[name]), seed, _largest_remainders(
                    len(parts[name]), fractions)).items()}
    train, val = round(fractions[0] * len(groups)), round(fractions[1] * len(groups))
    return _deal(members, seed, np.asarray([train, val, len(groups) - train - val]))


def _largest_remainders(count: int, fractions) -> np.ndarray:
    """``count`` cases shared by ``fractions`` to the whole case (Hamilton's method, ties to the
    later split): a stratum of three gets one case in each split where rounding gives test none."""
    shares = np.asarray(fractions, dtype=np.float64) * count
    targets = np.floor(shares + 1e-9).astype(int)
    order = sorted(range(3), key=lambda slot: (-round(shares[slot] - targets[slot], 9), -slot))
    targets[order[:count - int(targets.sum())]] += 1
    return targets


def _deal(members: dict[str, list[str]], seed: int, targets: np.ndarray) -> dict[str, str]:
    """Patient groups in seeded shuffled order, each to the split furthest below its target."""
    keys = list(members)
    order = np.random.default_rng(seed).permutation(len(keys))
    counts = np.zeros(3, dtype=int)
    splits = {}
    for position in order:
        group = members[keys[position]]
        slot = int(np.argmax(targets - counts))  # the split furthest below its target
        counts[slot] += len(group)
        splits.update((case_id, SPLITS[slot]) for case_id in group)
    return splits
