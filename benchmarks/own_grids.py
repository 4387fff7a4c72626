"""Studies as a scanner writes them against the same studies curated onto one grid: test Dice,
same training.

    python benchmarks/own_grids.py [--seeds 0,1] [--variants shared,own,exported,moved] [--cases 24]
                                   [--shape 48,96,96] [--out benchmarks/results/own_grids.json]

Per generator seed, the same synthetic four-sequence studies (infra/data/phantom.py) are written
into an embedded S3 as each variant says: ``shared``, co-registered in sequence folders, every
series on the study's grid; ``own``, in sequence folders but as a scanner writes them (the T1c and
the mask on the study's grid, the T1 an oblique stack, the T2 sagittal and finer in plane, the
FLAIR in thick axial slices; one frame of reference, infra/data/grids.py); ``exported``, the same
grids as a PACS exports the exam (``--layout studies``: UID-named objects, localiser, diffusion, ADC
and an MPR beside them, infra/data/exported.py), found by their headers; ``moved``, exported with
every study's FLAIR in a frame of reference of its own (the patient turned 5-10 degrees and shifted
5-15 mm, infra/data/grids.py ``frame_motion``), so each is registered when the catalog is built.
Every variant gets the same split (a ``manifest.csv``; for the exported studies by their study
IDs), and each is trained by ``entry_point/train.py`` with the demo's settings
(infra/launcher/demo.py); its test Dice per region (on the T1c's grid, where all hold the same
labels) and wall time are reported, with the ratio to ``shared``, and for ``exported`` and
``moved`` the confusion table of what each series was written as against what the rules found.
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

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.index import identity_key  # noqa: E402
from brainseg.data.listing import index_uri_for  # noqa: E402
from brainseg.dicom.header import identity_hash  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.layout import RunLayout  # noqa: E402
from infra.data.exported import SERIES_ORDER  # noqa: E402
from infra.data.synth import SynthSpec, case_id_for, write_dataset  # noqa: E402
from infra.launcher.demo import DEMO_HYPERPARAMETERS, DEMO_SEQUENCES  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-own-grids"
REGIONS = ("wt", "tc", "et")


def flags() -> list[str]:
    """The demo's hyperparameters as train.py flags."""
    out = []
    for name, value in DEMO_HYPERPARAMETERS.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out += [f"--{name.replace('_', '-')}", text]
    return out


VARIANTS = {"shared": dict(grids="shared"), "own": dict(grids="own"), "exported": dict(grids="own", layout="studies"),
            "moved": dict(grids="own", layout="studies")}  # moved: every study's FLAIR in a frame of its own


def spec_of(variant: str, seed: int, args) -> SynthSpec:
    """The generator's settings of ``variant``: the same studies, written as it says."""
    moved = args.cases if variant == "moved" else 0
    return SynthSpec(shape=args.shape, sequences=DEMO_SEQUENCES, seed=seed, other_frame=moved, **VARIANTS[variant])


def split_of(index: int) -> str:
    """One split for every variant: 60 % train, 20 % val, 20 % test, by case number."""
    return "train" if index % 5 < 3 else "val" if index % 5 == 3 else "test"


def manifest(case_ids: dict[int, str]) -> bytes:
    rows = ["case_id,split", *(f"{case_id},{split_of(index)}" for index, case_id in sorted(case_ids.items()))]
    return ("\n".join(rows) + "\n").encode()


def exported_ids(dataset: str, seed: int, cases: int) -> tuple[dict[int, str], dict]:
    """The exported studies' case IDs by case number (each study's PatientID, hashed with the dataset's
    identity key, names its number), the confusion table of written series against found roles, and how
    many sequences were registered from another frame."""
    catalog = build_catalog(dataset, sequences=DEMO_SEQUENCES, layout="studies")
    key = identity_key(index_uri_for(dataset.rstrip("/")))
    numbers = {identity_hash(key, f"SYN{seed:03d}{index:05d}"): index for index in range(cases)}
    ids = {numbers[case.image.headers[0].patient_hash]: case.case_id for case in catalog.cases}
    confusion: dict[str, dict[str, int]] = {}
    for verdicts in catalog.discovery.verdicts.values():
        for written, verdict in zip(SERIES_ORDER, verdicts):
            confusion.setdefault(written, {}).setdefault(verdict.role, 0)
            confusion[written][verdict.role] += 1
    registered = sum(item.registration is not None for case in catalog.cases for item in case.resampled.values())
    return ids, {"confusion": confusion, "usable": len(catalog.cases), "studies": cases, "registered": registered,
                 "excluded": {item.case_id: item.reason for item in catalog.exclusions}}


def one_seed(seed: int, args, work: Path) -> dict:
    out = {}
    for variant in args.variants:
        dataset = f"s3://{BUCKET}/seed{seed}-{variant}/"
        started = time.perf_counter()
        write_dataset(args.cases, dataset, spec_of(variant, seed, args), jobs=2)
        written = time.perf_counter() - started
        found = {}
        if VARIANTS[variant].get("layout") == "studies":
            ids, found = exported_ids(dataset, seed, args.cases)
            print(f"# seed {seed} {variant}: {found['usable']}/{found['studies']} studies usable; written -> found "
                  f"{found['confusion']}", flush=True)
        else:
            ids = {index: case_id_for(index) for index in range(args.cases)}
        s3.put_bytes(dataset + "manifest.csv", manifest(ids), "text/csv")
        name = f"seed{seed}-{variant}"
        run = ours.train(name, dataset, f"s3://{BUCKET}/runs", work / name, flags())
        summary = json.loads(s3.read_uri(f"s3://{BUCKET}/runs/{name}/" + RunLayout.SUMMARY))
        out[variant] = {"write_seconds": round(written, 1), "train_wall_seconds": run["wall_seconds"],
                        "best_val_dice": summary.get("best_val_dice"),
                        **{f"test_dice_{region}": summary.get(f"test_dice_{region}") for region in REGIONS},
                        "test_dice_mean": summary.get("test_dice_mean"),
                        "test_lesion_dice": summary.get("test_lesion_dice"), **found}
        print(f"# seed {seed} {variant}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in out[variant].items() if k != "confusion"), flush=True)
    if "shared" in out:
        for variant in list(out):
            if variant != "shared":
                out[f"ratio_{variant}_to_shared"] = {
                    key: round(out[variant][key] / out["shared"][key], 3)
                    for key in (*(f"test_dice_{r}" for r in REGIONS), "test_dice_mean") if out["shared"][key]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default="shared,own,exported", help=f"among {', '.join(VARIANTS)}")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--shape", default="48,96,96", help="D,H,W of the studies' own grid")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "own_grids.json")
    args = parser.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.variants = [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants {', '.join(unknown)}: expected among {', '.join(VARIANTS)}")
    report = {"cases": args.cases, "shape": args.shape, "hyperparameters": DEMO_HYPERPARAMETERS,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "seeds": {}}
    with EmbeddedS3() as server, tempfile.TemporaryDirectory() as work:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        for seed in (int(v) for v in args.seeds.split(",")):
            report["seeds"][seed] = one_seed(seed, args, Path(work))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    for seed, result in report["seeds"].items():
        for key, ratios in result.items():
            if key.startswith("ratio_"):
                print(f"seed {seed}: {key} test Dice {ratios}")
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
