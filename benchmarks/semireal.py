"""Semi-real benchmark: ours at its defaults beside MONAI's BraTS pipeline, over generator seeds.

    pip install --no-deps nilearn==0.14.1      # only its ICBM152 2009a template files are read
    python benchmarks/semireal.py [--seeds 0,1,2] [--kind mixed] [--cases 40] [--epochs 6] [--steps 100]
                                  [--channels 16,32,64,128] [--patch-size 56,64,64] [--batch-size 2]
                                  [--run NAME=FLAGS ...] [--mirror] [--monai] [--train-seeds 1,2]
                                  [--out benchmarks/results/semireal.json]

Per seed, ``--cases`` studies of ``--kind`` (benchmarks/anatomy.py: real anatomy, five lesion
types, several lesions and lesions under 2 ml, vessels and white-matter spots to be mistaken for
tumour, slices 1-4 mm) go into an embedded S3 as DICOM. Each ``--run`` (default one, ``defaults``)
is ``entry_point/train.py`` on them with our defaults, the benchmark's network (``--channels``,
patch, batch, steps) and its own flags; ``--monai`` adds MONAI's BraTS-tutorial pipeline
(benchmarks/monai_tutorial.py: its loss, optimiser, learning rate and augmentation) with the same
network, patch, batch, steps and split. The train/val/test split is the catalog's (20/8/12 of 40).
``--train-seeds`` trains every pipeline once per training seed T on the same studies and split:
each dataset gets a ``manifest.csv`` of the catalog's seed-0 split, ours runs with ``--seed T``
and MONAI's initial weights and transforms with the generator seed + 100 T; the runs are named
``<run>@T`` and pooled with the other seeds and training seeds under ``<run>``.

Every model is scored by benchmarks/scoring.py on the test studies as the generator made them
(its labels and lesion types; our DICOM reader is checked to return the same labels): voxel and
lesion-wise Dice per region, HD95, false-positive components per study before and after the
run's own postprocessing (``<run>`` raw, ``<run>+pp`` with the rules its validation chose; with
``--mirror`` also ``<run>+mirror`` and ``<run>+mirror+pp``, the test-time mirroring of
``predict.py --mirror true``), and
lesions found per size and type. Each seed's figures and the seeds pooled are printed and written
to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "entry_point")]

import anatomy  # noqa: E402
import monai_tutorial  # noqa: E402
import ours  # noqa: E402
import scoring  # noqa: E402

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.listing import MANIFEST_NAME  # noqa: E402
from brainseg.data.resample import median_spacing  # noqa: E402
from brainseg.data.splits import SPLITS  # noqa: E402
from brainseg.data.stream import read_case_region  # noqa: E402
from brainseg.io import s3, s3_writes  # noqa: E402
from brainseg.model.networks import NetworkSpec, build_model  # noqa: E402
from brainseg.postprocess import rules_of  # noqa: E402
from brainseg.prediction.predictor import MIRROR_FLIPS  # noqa: E402
from infra.data.synth import encode_study, write_files  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-semireal"
FLAGS = ["--sequences", ",".join(anatomy.SEQUENCES), "--labels", "ncr=1,ed=2,et=4", "--regions", "brats",
         "--num-workers", "2", "--log-every", "1000"]
HEADLINE = ("dice_wt", "dice_tc", "dice_et", "lesion_dice_mean", "lesions_found", "found_under 2 ml",
            "found_enhancing", "found_non-enhancing", "lesions_detected", "outside_ml_wt", "false_positives_per_study_wt",
            "false_positives_per_study_et")


def _make(seed: int, kind: str, index: int) -> tuple[str, anatomy.Study]:
    return f"case_{index:04d}", anatomy.make_study(kind, np.random.default_rng([seed, index, 17]))


def write_studies(cases: int, kind: str, seed: int, prefix: str) -> dict[str, anatomy.Study]:
    """``cases`` studies of ``kind`` written under ``prefix``; the generator's studies by case ID."""
    studies = {}
    with ProcessPoolExecutor(2) as pool:
        for case_id, study in pool.map(_make, [seed] * cases, [kind] * cases, range(cases)):
            write_files(encode_study(case_id, study.images, study.labels, study.spacing,
                                     f"SR{seed:02d}{case_id[-4:]}", "Semi^Real"), prefix)
            studies[case_id] = study
    return studies


def as_scored(case_id: str, study: anatomy.Study, case=None) -> dict:
    """What scoring.score_cases takes; ``case`` (the catalog's) adds our normalisation statistics."""
    return {"case_id": case_id, "image": np.stack([study.images[name] for name in anatomy.SEQUENCES]),
            "label": study.labels, "spacing": study.spacing, "lesions": study.lesions, "types": study.types,
            "case": case}


def check_reader(catalog, studies: dict, case_ids: list[str]) -> None:
    """Our DICOM reader returns the generator's labels for every scored study (else the benchmark stops)."""
    cases = {case.case_id: case for case in catalog.cases}
    for case_id in case_ids:
        depth, rows, columns = cases[case_id].image.shape
        _, mask = read_case_region(cases[case_id], (0, depth, 0, rows, 0, columns))
        if not np.array_equal(mask.astype(np.uint8), studies[case_id].labels):
            raise RuntimeError(f"{case_id}: our reader's labels differ from the generator's")


def split_ids(catalog) -> dict[str, list[str]]:
    """The sorted case IDs of each split of ``catalog``."""
    return {name: sorted(case.case_id for case in catalog.split(name)) for name in SPLITS}


def fix_split(dataset: str) -> None:
    """A ``manifest.csv`` of the catalog's seed-0 split in ``dataset``, so that ``--seed`` moves only
    a run's initial weights and patch stream."""
    splits = split_ids(build_catalog(dataset, sequences=anatomy.SEQUENCES, seed=0))
    rows = ["case_id,split", *(f"{case_id},{name}" for name, ids in splits.items() for case_id in ids)]
    s3_writes.put_bytes(dataset + MANIFEST_NAME, ("\n".join(rows) + "\n").encode(), "text/csv")


def one_seed(seed: int, args, runs: list[tuple[str, list[str]]]) -> dict:
    """Every run of one generator seed (and each training seed), scored on its test studies."""
    dataset = f"s3://{BUCKET}/semireal-{args.kind}-{seed}/"
    started = time.perf_counter()
    studies = write_studies(args.cases, args.kind, seed, dataset)
    print(f"# seed {seed}: {args.cases} {args.kind} studies written in {time.perf_counter() - started:.0f} s", flush=True)
    out = {"data": {"thickness_mm": sorted({s.spacing[0] for s in studies.values()}),
                    "lesion_types": {t: sum(s.types.count(t) for s in studies.values()) for t in anatomy.TYPES}},
           "runs": {}}
    training_seeds = [int(v) for v in args.train_seeds.split(",")] if args.train_seeds else [None]
    if args.train_seeds:
        fix_split(dataset)
    with tempfile.TemporaryDirectory() as work:
        trained = {}
        for (name, flags), training in itertools.product(runs, training_seeds):
            key = name if training is None else f"{name}@{training}"
            seeded = [] if training is None else ["--seed", str(training)]
            trained[key] = ours.train(f"{key.replace('@', '-t')}-{args.kind}-{seed}", dataset, f"s3://{BUCKET}/runs",
                                      Path(work) / key, [*training_flags(args), *flags, *seeded])
        catalog = build_catalog(dataset, sequences=anatomy.SEQUENCES, seed=0)
        splits = split_ids(catalog)
        out["split"] = {name: len(ids) for name, ids in splits.items()}
        check_reader(catalog, studies, splits["test"])
        cases = {case.case_id: case for case in catalog.cases}
        test = [as_scored(case_id, studies[case_id], cases[case_id]) for case_id in splits["test"]]
        variants = [("", ((),))] + ([("+mirror", MIRROR_FLIPS)] if args.mirror else [])
        for (name, run), (suffix, flips) in itertools.product(trained.items(), variants):
            rules = rules_of(run["loaded"].description.postprocessing)
            rows = scoring.score_cases([ours.member(run["loaded"], flips)], test, rules, ours.decide(run["loaded"]))
            out["runs"][name + suffix] = {"wall_seconds": run["wall_seconds"], **run["summary"],
                                          "validation_record": run["validation_record"],
                                          "scores": scoring.summarise(rows["raw"]), "per_case": rows["raw"]}
            after = rows.get("postprocessed", rows["raw"])
            out["runs"][f"{name}{suffix}+pp"] = {"rules": {key: rule.describe() for key, rule in rules.items()},
                                                 "scores": scoring.summarise(after), "per_case": after}
        for training in training_seeds if args.monai else ():
            spacing = median_spacing(studies[case_id].spacing for case_id in splits["train"])
            monai_seed = seed + 100 * (training or 0)
            torch.manual_seed(monai_seed)
            model = build_model(NetworkSpec(in_channels=len(anatomy.SEQUENCES), out_channels=len(scoring.REGIONS),
                                            channels=tuple(int(v) for v in args.channels.split(","))))
            patch = tuple(int(v) for v in args.patch_size.split(","))
            run = monai_tutorial.train(model, [as_scored(i, studies[i]) for i in splits["train"]],
                                       [as_scored(i, studies[i]) for i in splits["val"]], patch, args.batch_size,
                                       args.epochs, args.steps, monai_seed, spacing)
            rows = scoring.score_cases([monai_tutorial.member(model, patch, spacing)], test)["raw"]
            out["runs"]["monai" if training is None else f"monai@{training}"] = {
                **run, "scores": scoring.summarise(rows), "per_case": rows}
    return out


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The studies per seed and the network, patch, batch and steps every run of ours trains with."""
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--channels", default="16,32,64,128")
    parser.add_argument("--patch-size", default="56,64,64")
    parser.add_argument("--batch-size", type=int, default=2)


def training_flags(args) -> list[str]:
    """train.py's flags from :func:`add_training_arguments`' arguments, with the four sequences' :data:`FLAGS`."""
    return ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps), "--channels", args.channels,
            "--patch-size", args.patch_size, "--batch-size", str(args.batch_size), *FLAGS]


def parse_runs(values: list[str]) -> list[tuple[str, list[str]]]:
    """``NAME=FLAGS`` values as ``(name, flags)``."""
    return [(name.strip(), flags.split()) for name, _, flags in (value.partition("=") for value in values)]


def pooled_runs(seeds) -> dict:
    """Each run's scores pooled over the generator seeds and, for ``<run>@T``, the training seeds
    (under ``<run>``; ``<run>@T+pp`` under ``<run>+pp``)."""
    grouped: dict[str, list[dict]] = {}
    for seed in seeds:
        for key, run in seed["runs"].items():
            grouped.setdefault(re.sub(r"@\d+", "", key), []).append(run["scores"])
    return {name: scoring.pooled(scores) for name, scores in grouped.items()}


def table(results: dict) -> str:
    lines = ["| run | " + " | ".join(HEADLINE) + " |", "|" + "---|" * (len(HEADLINE) + 1)]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(str(result.get(key)) for key in HEADLINE) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="generator seeds, e.g. 0,1,2 (other studies of the same kind)")
    parser.add_argument("--kind", default="mixed", choices=sorted(anatomy.KINDS))
    add_training_arguments(parser)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=FLAGS",
                        help="a named run of ours and its extra train.py flags, e.g. 'fg=--foreground-fraction 0.5' "
                             "(repeatable; default one run, 'defaults', with none)")
    parser.add_argument("--mirror", action="store_true",
                        help="also score each run of ours averaged over the 8 mirrorings (<run>+mirror, 8x the inference)")
    parser.add_argument("--monai", action="store_true", help="also train and score MONAI's tutorial pipeline")
    parser.add_argument("--train-seeds", default="",
                        help="training seeds, e.g. 1,2: every pipeline trained once per seed on a split fixed by a "
                             "manifest.csv (default: one training, the split by the catalog's seed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "semireal.json")
    args = parser.parse_args(argv)
    runs = parse_runs(args.run) or [("defaults", [])]
    torch.set_num_threads(os.cpu_count() or 1)
    report = {"kind": args.kind, "cases": args.cases, "epochs": args.epochs, "steps_per_epoch": args.steps,
              "channels": args.channels, "patch_size": args.patch_size, "batch_size": args.batch_size,
              "runs": {name: flags for name, flags in runs}, "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "seeds": {}}
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        for seed in (int(v) for v in args.seeds.split(",")):
            report["seeds"][seed] = one_seed(seed, args, runs)
            print(f"# seed {seed}\n" + table({n: r["scores"] for n, r in report["seeds"][seed]["runs"].items()}),
                  flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    report["pooled"] = pooled_runs(report["seeds"].values())
    args.out.write_text(json.dumps(report, indent=1))
    print("# pooled over seeds " + args.seeds + "\n" + table(report["pooled"]))
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
