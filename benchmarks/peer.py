"""Peer comparison on synthetic studies: ours at its defaults beside MONAI's BraTS pipeline.

    python benchmarks/peer.py [--cases 24] [--shape 48,96,96] [--epochs 10] [--steps 50] [--thickness 1]
                              [--seed 0] [--ours-flag=--model=dynunet ...] [--folds 5] [--skip-monai]
                              [--out benchmarks/results/peer.json]

One embedded S3 holds multi-sequence synthetic studies (infra/data/synth.py: t1c, t1, t2, flair;
BraTS labels 1/2/4; one to three lesions per case, rim-enhancing, non-enhancing or solid). Both
pipelines train the benchmark's network (residual U-Net 8-64), patch (32×64×64), batch (2) and
steps, each with its own recipe:

  ours   entry_point/train.py at its defaults (loss, optimiser, learning rate, sampling,
         augmentation, postprocessing), patches streamed from S3 by ranged reads.
  monai  MONAI's BraTS-tutorial pipeline as its users write it (benchmarks/monai_tutorial.py:
         Dice + BCE, AdamW 1e-3, RandCropByPosNegLabeld, flips and intensity scale/shift), every
         volume in memory.

Both keep their best validation epoch; benchmarks/scoring.py scores both on the test split as
the generator made it (voxel and lesion-wise Dice, HD95, false-positive components, lesions found
per size and type); ours also as its run's postprocessing leaves it (``ours+pp``). With
``--thickness 1,2,3`` cases differ in slice thickness: each pipeline works at the training cases'
median spacing. ``--seed`` draws other studies from the generator; ``--ours-flag`` adds a train.py
flag to our run only (e.g. ``--ours-flag=--plan=auto``); ``--folds N`` also trains ours on each of
N cross-validation folds (the same test cases) and scores fold 0 alone and the N fold models as an
ensemble (sigmoid probabilities averaged; ``+pp``: the rules every fold chose);
``--skip-monai`` leaves the MONAI pipeline out.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "entry_point")]

import monai_tutorial  # noqa: E402
import ours  # noqa: E402
import scoring  # noqa: E402

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.resample import median_spacing  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.model.networks import NetworkSpec, build_model  # noqa: E402
from brainseg.postprocess import common_rules, rules_of  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-peer"
SEQUENCES = ("t1c", "t1", "t2", "flair")
CHANNELS, PATCH, BATCH = (8, 16, 32, 64), (32, 64, 64), 2  # the benchmark's network, patch and batch: both pipelines
FLAGS = ["--sequences", ",".join(SEQUENCES), "--labels", "ncr=1,ed=2,et=4", "--regions", "brats", "--channels",
         ",".join(map(str, CHANNELS)), "--patch-size", ",".join(map(str, PATCH)), "--batch-size", str(BATCH),
         "--num-workers", "2", "--log-every", "1000"]


def studies_of(spec: SynthSpec, cases: int, catalog) -> dict[str, dict]:
    """Every study as the generator made it (raw channels, labels, spacing) with its catalog case."""
    by_id = {case.case_id: case for case in catalog.cases}
    out = {}
    for index in range(cases):
        case_id = f"case_{index:04d}"
        if case_id in by_id:
            images, labels, spacing = spec.volumes(index)
            out[case_id] = {"case_id": case_id, "image": np.stack([images[name] for name in SEQUENCES]),
                            "label": labels, "spacing": tuple(spacing), "case": by_id[case_id]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--shape", default="48,96,96")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--thickness", default="1", help="slice thickness factors drawn per case (1: every case "
                        "at the same spacing)")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (other studies, same kinds)")
    parser.add_argument("--ours-flag", action="append", default=[], help="a train.py flag for our run only, "
                        "e.g. --ours-flag=--plan=auto (repeatable)")
    parser.add_argument("--folds", type=int, default=0, help="also train ours on each of N cross-validation folds "
                        "and score fold 0 alone and the N as an ensemble (N > 1)")
    parser.add_argument("--skip-monai", action="store_true", help="train and score only our pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer.json")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    controls = ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps), *FLAGS]
    with EmbeddedS3() as server, tempfile.TemporaryDirectory() as work:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        dataset, output = f"s3://{BUCKET}/brats/", f"s3://{BUCKET}/runs"
        spec = SynthSpec(shape=shape, sequences=SEQUENCES, thicknesses=tuple(int(v) for v in args.thickness.split(",")),
                         seed=args.seed)
        write_dataset(args.cases, dataset, spec, jobs=2)
        indexing = time.perf_counter()  # once per dataset, before either pipeline trains
        catalog = build_catalog(dataset, sequences=SEQUENCES, seed=0)
        index_seconds = round(time.perf_counter() - indexing, 1)
        print(f"# dataset indexed in {index_seconds} s", flush=True)
        mine = ours.train("ours", dataset, output, Path(work) / "ours", [*controls, *args.ours_flag])
        print(f"# ours trained in {mine['wall_seconds']} s", flush=True)
        folds = [ours.train(f"ours-fold{fold}", dataset, output, Path(work) / f"fold{fold}",
                            [*controls, *args.ours_flag, f"--fold={fold}", f"--folds={args.folds}"])
                 for fold in range(args.folds if args.folds > 1 else 0)]
        studies = studies_of(spec, args.cases, catalog)
        splits = {name: [case.case_id for case in catalog.split(name)] for name in ("train", "val", "test")}
        test = [studies[case_id] for case_id in splits["test"]]
        rules = rules_of(mine["loaded"].description.postprocessing)
        entries = [("ours", [ours.member(mine["loaded"])], rules, mine)]  # (name, members, rules, run)
        if folds:
            shared = common_rules([rules_of(fold["loaded"].description.postprocessing) for fold in folds])
            ensemble = {"wall_seconds": round(sum(fold["wall_seconds"] for fold in folds), 1)}
            entries += [("ours-fold0", [ours.member(folds[0]["loaded"])], {}, folds[0]),
                        (f"ours-{len(folds)}-fold-ensemble", [ours.member(fold["loaded"]) for fold in folds], shared,
                         ensemble)]
        if not args.skip_monai:
            spacing = median_spacing(studies[case_id]["spacing"] for case_id in splits["train"])
            torch.manual_seed(0)
            model = build_model(NetworkSpec(in_channels=len(SEQUENCES), out_channels=len(scoring.REGIONS),
                                            channels=CHANNELS))
            run = monai_tutorial.train(model, [studies[i] for i in splits["train"]], [studies[i] for i in splits["val"]],
                                       PATCH, BATCH, args.epochs, args.steps, 0, spacing)
            print(f"# monai trained in {run['wall_seconds']} s", flush=True)
            entries.append(("monai", [monai_tutorial.member(model, PATCH, spacing)], {}, run))
        results = {}
        for name, members, chosen, run in entries:
            rows = scoring.score_cases(members, test, chosen, scoring.threshold if name == "monai"
                                       else ours.decide(mine["loaded"]))
            results[name] = {"wall_seconds": run["wall_seconds"], **scoring.summarise(rows["raw"]),
                             "per_case": rows["raw"]}
            if "postprocessed" in rows:
                results[f"{name}+pp"] = {"rules": {key: rule.describe() for key, rule in chosen.items()},
                                         **scoring.summarise(rows["postprocessed"]), "per_case": rows["postprocessed"]}
    report = {"cases": args.cases, "shape": shape, "thickness": args.thickness, "seed": args.seed,
              "ours_flags": args.ours_flag, "split": {name: len(ids) for name, ids in splits.items()},
              "epochs": args.epochs, "steps_per_epoch": args.steps, "channels": CHANNELS, "patch_size": PATCH,
              "batch_size": BATCH, "ours_summary": mine["summary"], "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "index_seconds": index_seconds, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    columns = [key for key in results["ours"] if key != "per_case"]
    print("| pipeline | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, figures in results.items():
        print(f"| {name} | " + " | ".join(str(figures.get(key)) for key in columns) + " |")
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
