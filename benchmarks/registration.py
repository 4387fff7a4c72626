"""Registration across frames of reference against known motions: how close the catalog's rigid fit
comes to the motion the generator applied, and what it costs.

    python benchmarks/registration.py [--generator anatomy|phantom] [--cases 24] [--seed 0]
                                      [--out benchmarks/results/registration.json]

Per case, a four-sequence study (``anatomy``: benchmarks/anatomy.py, real anatomy from the MNI
template, slices 1-4 mm, needs ``pip install --no-deps nilearn==0.14.1``; ``phantom``:
infra/data/phantom.py, the product's own synthetic head, 96x128x128 at 1.5x1x1 mm) is written into
an embedded S3 as a PACS exports it (infra/data/exported.py: UID-named objects, extra series, each
sequence on its own grid) with its FLAIR in a frame of reference of its own: the patient turned
5-10 degrees about a random axis through the head's centre and shifted 5-15 mm
(infra/data/grids.py ``frame_motion``). The catalog (``--layout studies``) finds the sequences and
registers the FLAIR to the T1c; per case the fit is compared with the known motion: the angle of
the rotation between them, the error at the head's centre and the mean and largest error over the
head's voxels (mm), the heads' overlap before and after, and the seconds the fit took. Medians and
maxima over the cases are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "entry_point"), str(ROOT / "benchmarks")]

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.geometry import centre_of, grid_of, voxel_to_patient  # noqa: E402
from brainseg.data.index import identity_key  # noqa: E402
from brainseg.data.listing import index_uri_for  # noqa: E402
from brainseg.data.registration import otsu_level, rotation_degrees  # noqa: E402
from brainseg.dicom.header import identity_hash  # noqa: E402
from brainseg.io import s3  # noqa: E402
from infra.data.exported import encode_exported  # noqa: E402
from infra.data.grids import frame_motion, grid_centre  # noqa: E402
from infra.data.phantom import make_study  # noqa: E402
from infra.data.synth import write_files  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-registration"
SEQUENCES = ("t1c", "t1", "t2", "flair")
PHANTOM_SHAPE, PHANTOM_SPACING = (96, 128, 128), (1.5, 1.0, 1.0)


def study(generator: str, rng: np.random.Generator) -> tuple[dict, np.ndarray, tuple]:
    """``({sequence: volume}, labels, spacing)`` of one study."""
    if generator == "anatomy":
        import anatomy

        made = anatomy.make_study("mixed", rng)
        return {name: made.images[name] for name in SEQUENCES}, made.labels, tuple(made.spacing)
    made = make_study(PHANTOM_SHAPE, rng, SEQUENCES)
    return made.images, made.labels, PHANTOM_SPACING


def write(generator: str, cases: int, seed: int, prefix: str) -> dict[str, np.ndarray]:
    """The studies written under ``prefix``; the known motion of each by its PatientID."""
    motions = {}
    for index in range(cases):
        rng = np.random.default_rng([seed, index, 23])
        images, labels, spacing = study(generator, rng)
        shape = labels.shape
        origin = (-0.5 * shape[2] * spacing[2], -0.5 * shape[1] * spacing[1], -0.5 * shape[0] * spacing[0])
        patient = f"REG{seed:03d}{index:05d}"
        motions[patient] = frame_motion(rng, grid_centre(shape, spacing, origin))
        write_files(encode_exported(index, images, labels, spacing, origin, True, patient, "Registration^Bench",
                                    {"flair": motions[patient]}), prefix)
    return motions


def head_points(series) -> np.ndarray:
    """Patient positions (mm) of every second head voxel of ``series`` (each axis)."""
    image = series.read_volume()[::2, ::2, ::2]
    z, y, x = np.nonzero(image > otsu_level(image))
    voxels = np.stack([z * 2, y * 2, x * 2, np.ones_like(z)], axis=1).astype(float)
    return (voxel_to_patient(grid_of(series)) @ voxels.T).T[:, :3]


def compare(case, truth: np.ndarray) -> dict:
    """The catalog's fit of the case's FLAIR against the known motion ``truth``."""
    registration = case.resampled["flair"].registration
    fitted = registration.transform
    residual = np.linalg.inv(truth) @ fitted
    points = head_points(case.image)

    def moved(matrix, at):
        return at @ matrix[:3, :3].T + matrix[:3, 3]

    errors = np.linalg.norm(moved(fitted, points) - moved(truth, points), axis=1)
    centre = centre_of(case.image)[None]
    return {"case_id": case.case_id,
            "true_rotation_degrees": round(rotation_degrees(truth), 2),
            "true_shift_at_centre_mm": round(float(np.linalg.norm(moved(truth, centre) - centre)), 2),
            "rotation_error_degrees": round(rotation_degrees(residual), 3),
            "centre_error_mm": round(float(np.linalg.norm(moved(fitted, centre) - moved(truth, centre))), 3),
            "mean_head_error_mm": round(float(errors.mean()), 3), "max_head_error_mm": round(float(errors.max()), 3),
            "head_dice_before": registration.head_dice_before, "head_dice_after": registration.head_dice,
            "metric": round(registration.metric, 4), "seconds": registration.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", choices=("anatomy", "phantom"), default="anatomy")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "registration.json")
    args = parser.parse_args(argv)
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        dataset = f"s3://{BUCKET}/{args.generator}-{args.seed}/"
        started = time.perf_counter()
        motions = write(args.generator, args.cases, args.seed, dataset)
        print(f"# {args.cases} {args.generator} studies written in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        catalog = build_catalog(dataset, sequences=SEQUENCES, layout="studies", split_fractions=(1.0, 0.0, 0.0))
        catalog_seconds = time.perf_counter() - started
        key = identity_key(index_uri_for(dataset.rstrip("/")))
        truth = {identity_hash(key, patient): motion for patient, motion in motions.items()}
        rows = [compare(case, truth[case.image.headers[0].patient_hash]) for case in catalog.cases]
    for row in rows:
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    summary = {"studies": args.cases, "usable": len(catalog.cases),
               "excluded": {item.case_id: item.reason for item in catalog.exclusions},
               "catalog_seconds": round(catalog_seconds, 1)}
    for key in ("rotation_error_degrees", "centre_error_mm", "mean_head_error_mm", "max_head_error_mm",
                "head_dice_after", "seconds"):
        values = [row[key] for row in rows]
        if values:
            summary[f"{key}_median"] = round(float(np.median(values)), 3)
            summary[f"{key}_max"] = round(float(np.max(values)), 3)
    summary["within_1mm_and_1deg"] = sum(row["rotation_error_degrees"] <= 1.0 and row["mean_head_error_mm"] <= 1.0
                                         for row in rows)
    report = {"generator": args.generator, "seed": args.seed, "cases": args.cases, "summary": summary, "rows": rows,
              "cpu_count": os.cpu_count(), "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
