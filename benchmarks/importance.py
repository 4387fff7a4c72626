"""Sequence importance, checked on lesions the generator made visible in one sequence only.

    pip install --no-deps nilearn==0.14.1      # only its ICBM152 2009a template files are read
    python benchmarks/importance.py [--seeds 0] [--cases 40] [--epochs 6] [--steps 100]
                                    [--run NAME=FLAGS ...] [--out benchmarks/results/importance.json]

Per seed, ``--cases`` semi-real studies of the ``one-sequence`` kind (benchmarks/anatomy.py: most
lesions are bright only on FLAIR, labelled oedema, or only on T1c, labelled enhancing; the rest
are rim, solid and non-enhancing tumours) go into an embedded S3 as DICOM, and
``entry_point/train.py`` trains each ``--run`` on them (default: ``default`` with no extra flags and
``dropout`` with ``--sequence-dropout 0.5``) with semireal.py's network, patch and steps.

Then every test study is scored by benchmarks/scoring.py as it is and with each sequence replaced
by zeros after normalisation (what the run's own ``sequence_importance`` does): Dice per region,
and per generator type the lesions found and their mean local Dice (the predicted whole tumour
against the lesion within 5 mm of it: it falls when a lesion is missed and when the prediction
floods around it, where *found* would still count it). The sequence the generator made
informative for a type is the one whose removal costs that type's lesions most: FLAIR for
``flair-only``, T1c for ``t1c-only``. A sequence whose removal costs every type says that the
network leans on it, not that it carries the tumour. The run's own ``sequence_importance``
(summary.json) is kept beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "entry_point")]

import anatomy  # noqa: E402
import ours  # noqa: E402
import scoring  # noqa: E402
import semireal  # noqa: E402

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.layout import RunLayout  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-importance"
KIND = "one-sequence"
TYPES = ("flair-only", "t1c-only", "rim", "solid", "non-enhancing")
DEFAULT_RUNS = ["default=", "dropout=--sequence-dropout 0.5"]


def without(member: scoring.Member, channel: int | None) -> scoring.Member:
    """``member`` with input ``channel`` replaced by zeros after normalisation (``None``: unchanged)."""
    if channel is None:
        return member

    def normalise(study: dict) -> np.ndarray:
        image = member.normalise(study)
        image[channel] = 0.0
        return image

    return dataclasses.replace(member, normalise=normalise)


def figures(rows: list[dict]) -> dict:
    """Dice per region, and per generator type the lesions found and their mean local Dice, over
    one scoring's rows."""
    summary = scoring.summarise(rows)
    return {**{f"dice_{name}": summary[f"dice_{name}"] for name in scoring.REGIONS},
            **{kind: summary.get(f"found_type_{kind}", "0/0") for kind in TYPES},
            **{f"local_dice_{kind}": summary.get(f"local_dice_type_{kind}") for kind in TYPES}}


def one_seed(seed: int, args, runs: list[tuple[str, list[str]]]) -> dict:
    dataset = f"s3://{BUCKET}/{KIND}-{seed}/"
    started = time.perf_counter()
    studies = semireal.write_studies(args.cases, KIND, seed, dataset)
    print(f"# seed {seed}: {args.cases} studies written in {time.perf_counter() - started:.0f} s", flush=True)
    out = {"lesion_types": {t: sum(s.types.count(t) for s in studies.values()) for t in anatomy.TYPES}, "runs": {}}
    catalog = build_catalog(dataset, sequences=anatomy.SEQUENCES, seed=0)
    test_ids = sorted(case.case_id for case in catalog.split("test"))
    semireal.check_reader(catalog, studies, test_ids)
    cases = {case.case_id: case for case in catalog.cases}
    test = [semireal.as_scored(case_id, studies[case_id], cases[case_id]) for case_id in test_ids]
    with tempfile.TemporaryDirectory() as work:
        for name, flags in runs:
            run = ours.train(f"{name}-{seed}", dataset, f"s3://{BUCKET}/runs", Path(work) / name, [*semireal.training_flags(args), *flags])
            summary = json.loads(s3.read_uri(f"s3://{BUCKET}/runs/{name}-{seed}/{RunLayout.SUMMARY}"))
            member = ours.member(run["loaded"])
            scored = {}
            for channel, sequence in [(None, "(intact)"), *enumerate(anatomy.SEQUENCES)]:
                rows = scoring.score_cases([without(member, channel)], test, decide=ours.decide(run["loaded"]))["raw"]
                scored[sequence] = figures(rows)
                print(f"{name} without {sequence}: {scored[sequence]}", flush=True)
            out["runs"][name] = {"flags": flags, "wall_seconds": run["wall_seconds"], "scored": scored,
                                 "sequence_importance": summary.get("sequence_importance")}
    return out


def table(runs: dict) -> str:
    """Per run and sequence removed: Dice per region, and per type lesions found (local Dice)."""
    lines = ["| run | without | Dice WT / TC / ET | " + " | ".join(f"{kind} found (local Dice)" for kind in TYPES)
             + " |", "|" + "---|" * (len(TYPES) + 3)]
    for name, run in runs.items():
        for sequence, values in run["scored"].items():
            dice = " / ".join(f"{values[f'dice_{region}']:.3f}" for region in scoring.REGIONS)
            cells = [f"{values[kind]} ({values[f'local_dice_{kind}']:.2f})" if values[f"local_dice_{kind}"] is not None
                     else values[kind] for kind in TYPES]
            lines.append(f"| {name} | {sequence} | {dice} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    semireal.add_training_arguments(parser)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=FLAGS",
                        help=f"a named run and its extra train.py flags (repeatable; default {DEFAULT_RUNS})")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "importance.json")
    args = parser.parse_args(argv)
    runs = semireal.parse_runs(args.run or DEFAULT_RUNS)
    torch.set_num_threads(os.cpu_count() or 1)
    report = {"kind": KIND, "cases": args.cases, "epochs": args.epochs, "steps_per_epoch": args.steps,
              "channels": args.channels, "patch_size": args.patch_size, "batch_size": args.batch_size,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "seeds": {}}
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        for seed in (int(value) for value in args.seeds.split(",")):
            report["seeds"][seed] = one_seed(seed, args, runs)
            print(f"# seed {seed}: lesions {report['seeds'][seed]['lesion_types']}\n"
                  + table(report["seeds"][seed]["runs"]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
