"""Semi-real benchmark: train on studies built from real adult brain anatomy, not our generator's
ellipsoids, and score the run voxel- and lesion-wise.

    pip install --no-deps nilearn==0.14.1      # only its ICBM152 2009a template files are read
    python benchmarks/semireal.py [--cases 40] [--seed 0] [--epochs 6] [--steps 100]
                                  [--run 'NAME=--flag value ...' ...] [--out benchmarks/results/semireal.json]

Each study starts from the ICBM152 2009a T1 and its grey- and white-matter probability maps
(nilearn's copies, 1 mm), moved per case (rotation up to 10°, scale 0.9-1.1, shift up to 6 mm) and
sampled at 1.5 mm. Cerebrospinal fluid is the brain's remainder. Four sequences come from the
tissue maps with their usual contrasts (T1 is the template's own intensities), each with its own
gain, a smooth bias field and Rician noise. One to three lesions per case, anywhere in the
cerebral white or grey matter, irregular (a thresholded smooth random field), 4-48 mm across:
enhancing rim around necrosis, solid enhancing, or non-enhancing; oedema around most. Lesion
intensities overlap normal tissue: oedema is GM-like on T1, and on FLAIR only some 30% brighter
than GM; the non-enhancing core is GM-like on T1c. Slices are 1.5, 2, 3 or 4 mm thick (partial
volume: the thin slices averaged), BraTS labels 1 (necrosis), 2 (oedema), 4 (enhancing).

Each ``--run`` is train.py on the same studies in an embedded S3 with the flags below, its own
flags, and our defaults otherwise (BraTS regions); its summary's voxel and lesion-wise test figures
are reported side by side. Without ``--run``: one run of the defaults. ``--monai`` adds the MONAI
pipeline of ``benchmarks/peer.py`` (the first run's network, patch, batch, steps, optimiser and
schedule; volumes resampled in memory to the training cases' median spacing, as ``Spacingd``
would), scored by the same code.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "entry_point")]

from brainseg.io import s3  # noqa: E402
from infra.data.synth import encode_study, write_files  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-semireal"
SEQUENCES = ("t1c", "t1", "t2", "flair")
VOXEL_MM = 1.5
THICKNESSES = (1.5, 2.0, 3.0, 4.0)
# Mean intensity per tissue and sequence, relative to white matter on T1 (T1 itself: the template).
CONTRAST = {  # csf, grey, white, oedema, necrosis, enhancing, non-enhancing core
    "t1c": (0.25, 0.75, 1.0, 0.72, 0.35, 1.45, 0.70),
    "t2": (1.0, 0.55, 0.40, 0.78, 0.95, 0.60, 0.70),
    "flair": (0.15, 0.55, 0.45, 0.72, 0.45, 0.62, 0.68),
}
T1_LESION = (None, None, None, 0.74, 0.35, 0.80, 0.68)  # on T1: oedema GM-like, the rest darker than WM
FLAGS = ["--sequences", ",".join(SEQUENCES), "--labels", "ncr=1,ed=2,et=4", "--regions", "brats",
         "--num-workers", "2", "--log-every", "1000"]


def templates() -> dict[str, np.ndarray]:
    """The T1, GM and WM maps as ``(z, y, x)`` float32 in [0, 1], 1 mm."""
    import nibabel

    base = importlib.resources.files("nilearn") / "datasets" / "data"
    maps = {}
    for name in ("t1", "gm", "wm"):
        volume = np.asarray(nibabel.load(str(base / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")).dataobj)
        maps[name] = np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1], dtype=np.float32) / 255.0
    return maps


def _moved(maps: dict, rng: np.random.Generator) -> dict:
    """Every map rotated, scaled and shifted by one random transform, sampled at ``VOXEL_MM``."""
    angles = np.deg2rad(rng.uniform(-10, 10, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = rotation @ turn
    matrix = rotation / rng.uniform(0.9, 1.1) * VOXEL_MM  # output voxel -> template mm (= voxel)
    shape = tuple(int(n / VOXEL_MM) for n in maps["t1"].shape)
    centre_in, centre_out = (np.asarray(maps["t1"].shape) - 1) / 2, (np.asarray(shape) - 1) / 2
    offset = centre_in - matrix @ centre_out + rng.uniform(-4, 4, 3)
    return {name: ndimage.affine_transform(volume, matrix, offset, output_shape=shape, order=1)
            for name, volume in maps.items()}


def _blob(shape: tuple, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob about ``radius`` voxels across around ``centre``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    distance = np.linalg.norm(grid - centre, axis=-1) / radius
    field = ndimage.gaussian_filter(rng.normal(size=shape), max(radius / 3, 1.0))
    field /= field.std() + 1e-8
    return distance + 0.25 * field < 1.0


def _lesions(brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tissue codes of lesions: 3 oedema, 4 necrosis, 5 enhancing, 6 non-enhancing core (0 none)."""
    codes = np.zeros(brain.shape, dtype=np.uint8)
    inner = ndimage.binary_erosion(brain, iterations=6)
    candidates = np.argwhere(inner)
    for _ in range(rng.integers(1, 4)):
        centre = candidates[rng.integers(len(candidates))].astype(float)
        radius = rng.choice([rng.uniform(1.5, 3.5), rng.uniform(5, 16)], p=[0.25, 0.75])  # voxels of 1.5 mm
        box = tuple(slice(max(0, int(c - 3 * radius)), min(n, int(c + 3 * radius) + 1)) for c, n in zip(centre, brain.shape))
        local = centre - [b.start for b in box]
        shape = tuple(b.stop - b.start for b in box)
        core = _blob(shape, local, radius, rng)
        kind = rng.choice(["rim", "solid", "non-enhancing"], p=[0.5, 0.25, 0.25])
        region = np.zeros(shape, dtype=np.uint8)
        if rng.random() < 0.8:
            region[_blob(shape, local, radius * rng.uniform(1.4, 2.2), rng)] = 3
        if kind == "rim" and radius > 3:
            region[core] = 5
            region[_blob(shape, local, radius * 0.6, rng)] = 4
        else:
            region[core] = 5 if kind == "solid" else 6
        region[~brain[box]] = 0
        target = codes[box]
        target[region > target] = region[region > target]
    return codes


def make_semireal(maps: dict, rng: np.random.Generator) -> tuple[dict, np.ndarray, tuple]:
    """``({sequence: int16 volume}, BraTS labels, spacing)`` of one study."""
    moved = _moved(maps, rng)
    grey, white = moved["gm"], moved["wm"]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(grey + white > 0.3, iterations=3))
    csf = np.clip(brain - grey - white, 0, 1)
    codes = _lesions(brain, rng)
    lesion = codes > 0
    images = {}
    for sequence in SEQUENCES:
        if sequence == "t1":
            volume = moved["t1"] / max(np.percentile(moved["t1"][white > 0.9], 50), 1e-3)
            table = T1_LESION
        else:
            table = CONTRAST[sequence]
            volume = csf * table[0] + grey * table[1] + white * table[2]
        for code in range(3, 7):
            volume = np.where(codes == code, table[code], volume)
        volume = np.where(lesion, ndimage.gaussian_filter(volume, 0.7), volume)  # soft lesion borders
        volume = volume * brain * rng.uniform(0.7, 1.4) * _bias(volume.shape, rng)
        noise = 0.04 * rng.uniform(0.7, 1.3)
        volume = np.hypot(volume + rng.normal(0, noise, volume.shape), rng.normal(0, noise, volume.shape))
        images[sequence] = volume
    labels = np.select([codes == 3, codes == 4, codes >= 5], [2, 1, 4], 0).astype(np.uint8)
    thickness = float(rng.choice(THICKNESSES))
    step = thickness / VOXEL_MM
    positions = np.arange(0, labels.shape[0] - step, step)
    thick = {name: np.stack([_slab(volume, z, step) for z in positions]) for name, volume in images.items()}
    picked = labels[np.minimum(np.round(positions + step / 2 - 0.5).astype(int), labels.shape[0] - 1)]
    scale = 1000.0 / max(np.percentile(thick["t1"], 99), 1e-3)
    out = {name: np.clip(volume * scale, 0, 32000).astype(np.int16) for name, volume in thick.items()}
    return out, picked, (thickness, VOXEL_MM, VOXEL_MM)


def _slab(volume: np.ndarray, start: float, step: float) -> np.ndarray:
    """The mean of the thin slices a thick slice from ``start`` covers (partial volume)."""
    first, last = int(np.floor(start)), int(np.ceil(start + step))
    return volume[first:max(last, first + 1)].mean(0)


def _bias(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    axes = [np.linspace(-1, 1, n) for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    a = rng.uniform(-0.15, 0.15, 3)
    return (1 + a[0] * z + a[1] * y + a[2] * x).astype(np.float32)


def write_semireal(cases: int, out: str, seed: int) -> dict:
    maps = templates()
    kinds = []
    for index in range(cases):
        rng = np.random.default_rng([seed, index, 17])
        images, labels, spacing = make_semireal(maps, rng)
        kinds.append({"thickness_mm": spacing[0], "tumour_ml": float((labels > 0).sum() * np.prod(spacing) / 1000)})
        write_files(encode_study(f"case_{index:04d}", images, labels, spacing, f"SR{index:05d}", "Semi^Real"), out)
    return {"thickness_mm": sorted({k["thickness_mm"] for k in kinds}),
            "median_tumour_ml": float(np.median([k["tumour_ml"] for k in kinds]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=FLAGS",
                        help="a named run and its train.py flags, e.g. 'plan=--plan auto' (repeatable)")
    parser.add_argument("--monai", action="store_true", help="also train and score the MONAI pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "semireal.json")
    args = parser.parse_args(argv)
    runs = [(name.strip(), flags.split()) for name, _, flags in (run.partition("=") for run in args.run)] or [
        ("defaults", [])]
    report = {"cases": args.cases, "seed": args.seed, "epochs": args.epochs, "steps_per_epoch": args.steps,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "runs": {}}
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        report["data"] = write_semireal(args.cases, f"s3://{BUCKET}/semireal/", args.seed)
        print(f"# {args.cases} studies written in {time.perf_counter() - started:.0f} s: {report['data']}", flush=True)
        for name, flags in runs:
            report["runs"][name] = train_once(name, flags, args)
            print(json.dumps({name: {key: report["runs"][name].get(key) for key in HEADLINE}}), flush=True)
        if args.monai:
            report["runs"]["monai"] = monai_once(report["runs"][runs[0][0]], args)
            print(json.dumps({"monai": report["runs"]["monai"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("| run | " + " | ".join(HEADLINE) + " |")
    print("|" + "---|" * (len(HEADLINE) + 1))
    for name, result in report["runs"].items():
        print(f"| {name} | " + " | ".join(f"{result.get(key):.4g}" if isinstance(result.get(key), float)
                                         else str(result.get(key)) for key in HEADLINE) + " |")
    print(f"# written to {args.out}")
    return 0


HEADLINE = ("wall_seconds", "best_val_dice", "test_dice_mean", "test_dice_wt", "test_dice_tc", "test_dice_et",
            "test_lesion_dice", "best_epoch")


def monai_once(first: dict, args) -> dict:
    """The MONAI pipeline with the first run's settings, scored on its test cases like ours."""
    import dataclasses

    import peer

    from brainseg.config import Hyperparameters
    from brainseg.data.catalog import build_catalog
    from brainseg.data.resample import TargetSpacing, median_spacing
    from brainseg.model.networks import NetworkSpec, build_model

    settings = dict(first["hyperparameters"])
    hp = Hyperparameters(**{**settings, "data_uri": "", "output_uri": "", "run_name": ""})
    catalog = build_catalog(f"s3://{BUCKET}/semireal/", sequences=SEQUENCES, seed=hp.seed)
    train, val, test = (peer._volumes(catalog.split(name)) for name in ("train", "val", "test"))
    spacing = median_spacing(volume["case"].image.spacing for volume in train)
    target = TargetSpacing(spacing)
    resampled = []
    for volume in train:
        grid = target.grid_of(volume["case"])
        resampled.append({"image": grid.volume_to_target(volume["image"].astype(np.float32)),
                          "label": grid.volume_to_target(volume["label"], labels=True), "case": volume["case"]})
    started = time.perf_counter()
    run = peer.train_monai(resampled, val, dataclasses.replace(hp, epochs=args.epochs, steps_per_epoch=args.steps),
                           spacing)
    model = build_model(NetworkSpec.of(hp, len(peer.REGIONS)))
    model.load_state_dict(run["weights"])
    scores = peer.summarise(peer.score_cases([(model, hp, "monai", spacing)], test))
    return {"wall_seconds": round(time.perf_counter() - started, 1), "test_dice_mean": scores["dice_mean"],
            **{f"test_dice_{name}": scores[f"dice_{name}"] for name in peer.REGIONS},
            "test_lesion_dice": scores["lesion_dice_mean"], "scores": scores}


def train_once(name: str, flags: list[str], args) -> dict:
    """One train.py run on the studies; its summary's figures (or its error)."""
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, str(ROOT / "entry_point" / "train.py"), "--data-uri", f"s3://{BUCKET}/semireal/",
                   "--output-uri", f"s3://{BUCKET}/runs", "--run-name", name, "--epochs", str(args.epochs),
                   "--steps-per-epoch", str(args.steps), *FLAGS, *flags]
        started = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True,
                               env=dict(os.environ, SM_MODEL_DIR=work, BRAINSEG_CACHE_DIR=str(Path(work) / "cache")))
    seconds = round(time.perf_counter() - started, 1)
    print("\n".join(line for line in child.stdout.splitlines() if any(
        tag in line for tag in ("epoch_metrics", "test_metrics", "plan:", "postprocessing", "target spacing"))))
    if child.returncode != 0:
        return {"flags": flags, "wall_seconds": seconds, "error": (child.stdout[-2000:] + child.stderr[-2000:])}
    summary = json.loads(s3.read_uri(f"s3://{BUCKET}/runs/{name}/summary.json"))
    return {"flags": flags, "wall_seconds": seconds, "hyperparameters": summary["hyperparameters"],
            **{key: summary.get(key) for key in (*HEADLINE[1:], "lesion_wise", "postprocessing")}}


if __name__ == "__main__":
    sys.exit(main())
