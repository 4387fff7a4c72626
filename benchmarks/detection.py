"""Detection and sequence importance on studies with and without tumour, at the demo's settings.

    python benchmarks/detection.py [--seeds 0,1] [--cases 32] [--healthy-fraction 0.25]
                                   [--keep DIR] [--out benchmarks/results/detection.json]

Per seed, ``--cases`` synthetic four-sequence studies of the demo's shape (brainseg-synth, T1c, T1,
T2, FLAIR; BraTS labels), ``--healthy-fraction`` of them tumour-free, go into an embedded S3 and
``entry_point/train.py`` trains on them with the demo's hyperparameters (500 steps). Printed and
written: the run's study-level detection on its test split (the threshold chosen on validation,
the confusion table, sensitivity, specificity, ROC AUC, slice counts), its sequence importance (the
test Dice of each region with each sequence replaced by zeros), its test Dice, and the wall time.
``--keep DIR`` copies each run (all but its checkpoints) to ``DIR/seed<N>/`` for the review.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "entry_point")]

import ours  # noqa: E402

from brainseg.io import s3  # noqa: E402
from brainseg.layout import RunLayout  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.launcher.demo import DEMO_HYPERPARAMETERS, DEMO_SEQUENCES, DEMO_SHAPE, save_locally  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-detection"


def flags() -> list[str]:
    """The demo's hyperparameters as train.py flags."""
    out = []
    for name, value in DEMO_HYPERPARAMETERS.items():
        out += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def run_seed(seed: int, cases: int, healthy: float, work: Path, keep: Path | None) -> dict:
    data = f"s3://{BUCKET}/seed{seed}/data/"
    started = time.perf_counter()
    write_dataset(cases, data, SynthSpec(shape=DEMO_SHAPE, sequences=DEMO_SEQUENCES, seed=seed, healthy_fraction=healthy),
                  jobs=2)
    written = time.perf_counter() - started
    trained = ours.train(f"seed{seed}", data, f"s3://{BUCKET}/seed{seed}/runs/", work / f"model{seed}", flags())
    summary = json.loads(s3.read_uri(f"s3://{BUCKET}/seed{seed}/runs/seed{seed}/{RunLayout.SUMMARY}"))
    if keep:
        save_locally(f"s3://{BUCKET}/seed{seed}/runs/", f"seed{seed}", keep)
    return {"seed": seed, "write_seconds": round(written, 1), "train_wall_seconds": trained["wall_seconds"],
            "test_dice": {name: summary.get(f"test_dice_{name}") for name in summary["structures"]},
            "detection": summary.get("detection"), "sequence_importance": summary.get("sequence_importance")}


def show(result: dict) -> None:
    found = result["detection"]
    print(f"# seed {result['seed']}: test Dice {result['test_dice']}; training {result['train_wall_seconds']} s")
    print(f"detection: {found['cases']} test studies ({found['with_tumour']} with tumour, {found['tumour_free']} "
          f"without); threshold {found['threshold']['ml']} ml ({found['threshold']['chosen_on']}); "
          f"TP {found['true_positives']} FN {found['false_negatives']} FP {found['false_positives']} "
          f"TN {found['true_negatives']}; sensitivity {found['sensitivity']} specificity {found['specificity']} "
          f"ROC AUC {found['roc_auc']}; slices {found['slices']}")
    importance = result["sequence_importance"]
    print(f"| without ({importance['cases']} test cases) | " + " | ".join(importance["intact"]) + " |")
    print("|---|" + "---|" * len(importance["intact"]))
    print("| (intact) | " + " | ".join(f"{values['dice']:.3f}" for values in importance["intact"].values()) + " |")
    for sequence, structures in importance["without"].items():
        print(f"| {sequence} | " + " | ".join(f"{values['dice']:.3f} ({-values['dice_drop']:+.3f})"
                                             for values in structures.values()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--healthy-fraction", type=float, default=0.25)
    parser.add_argument("--keep", type=Path, help="copy each run here, for brainseg-review")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    args = parser.parse_args()
    results = []
    with EmbeddedS3() as server, tempfile.TemporaryDirectory() as work:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        for seed in (int(value) for value in args.seeds.split(",")):
            results.append(run_seed(seed, args.cases, args.healthy_fraction, Path(work), args.keep))
            show(results[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": args.cases, "healthy_fraction": args.healthy_fraction,
                                    "hyperparameters": DEMO_HYPERPARAMETERS, "cpu_count": os.cpu_count(),
                                    "platform": platform.platform(), "seeds": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
