"""Peer comparison: our streamed pipeline vs the one a MONAI user would write, on the same data.

    python benchmarks/peer.py [--cases 24] [--shape 48,96,96] [--epochs 10] [--steps 50] [--thickness 1]
                              [--seed 0] [--ours-flag=--model=dynunet ...] [--folds 5] [--skip-monai]
                              [--out benchmarks/results/peer.json]

One embedded S3 holds multi-sequence synthetic studies (t1c, t1, t2, flair; BraTS labels 1/2/4;
one to three lesions per case, rim-enhancing, non-enhancing or solid). Both pipelines train the
same network (our residual U-Net), loss (Dice + BCE over the sigmoid regions WT/TC/ET), optimiser,
schedule, patch size, batch size and number of steps, and keep the weights of their best
validation epoch:

  ours   entry_point/train.py: patches streamed from S3 by ranged reads (the catalog's split).
  monai  every volume read into memory first (the same split; our DICOM reader, since MONAI's
         DICOM loaders need ITK), then CacheDataset with ConvertToMultiChannelBasedOnBratsClassesd,
         NormalizeIntensityd (channel-wise, non-zero), RandCropByPosNegLabeld (1:1, 4 samples),
         RandFlipd on each axis, RandScaleIntensityd, RandShiftIntensityd, as MONAI's BraTS tutorial.

With ``--thickness 1,2,3`` cases differ in slice thickness: ours trains at the median spacing
(``--target-spacing``), the MONAI pipeline on the native grids as loaded (no Spacingd).

Both best models are then scored by the same code on the test split: sliding-window inference
(Gaussian, overlap 0.25), Dice and HD95 per region (MONAI's metrics), BraTS's lesion-wise Dice
and HD95 per region (:mod:`brainseg.metrics`; ours also as its run's postprocessing, chosen on
its validation cases, leaves the prediction: row ``ours+pp``), and per-lesion detection
by appearance: each connected whole-tumour lesion is "enhancing" when it holds an enhancing
voxel, else "non-enhancing" (a lesion darker than tissue on T1 and T1c); it counts as detected
when the predicted whole tumour covers at least half of it. ``--seed`` draws other studies from
the generator (data the defaults were not tuned on); ``--ours-flag`` adds a train.py flag to our
run only (e.g. ``--ours-flag=--plan=auto``; ours is then scored with its own saved network, patch
and grid), ``--folds N`` also trains ours on each of N cross-validation folds (the same test cases)
and scores fold 0 alone and the N fold models as an ensemble (sigmoid probabilities averaged;
``+pp``: the postprocessing rules every fold chose), ``--skip-monai`` leaves the MONAI pipeline out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_hausdorff_distance
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]

from brainseg.config import Hyperparameters  # noqa: E402
from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.data.resample import Grid  # noqa: E402
from brainseg.data.stream import read_case_region  # noqa: E402
from brainseg.data.transforms import normalize  # noqa: E402
from brainseg.io import s3  # noqa: E402
from brainseg.metrics import lesion_wise  # noqa: E402
from brainseg.model.networks import NetworkSpec, build_model  # noqa: E402
from brainseg.model.optim import build_optimizer, build_scheduler  # noqa: E402
from brainseg.overlap import Overlap  # noqa: E402
from brainseg.postprocess import apply_rules, common_rules, rules_of  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

BUCKET = "bench-peer"
SEQUENCES = ("t1c", "t1", "t2", "flair")
REGIONS = ("wt", "tc", "et")  # our channel order (--regions brats)
SETTINGS = {"sequences": ",".join(SEQUENCES), "labels": "ncr=1,ed=2,et=4", "regions": "brats",
            "channels": (8, 16, 32, 64), "patch_size": (32, 64, 64), "res_units": 2, "batch_size": 2, "lr": 3e-3,
            "warmup_steps": 20, "foreground_fraction": 0.5, "num_workers": 2, "log_every": 1000, "patience": 0}
DETECTED_FRACTION = 0.5


def _hp(epochs: int, steps: int) -> Hyperparameters:
    return Hyperparameters(**SETTINGS, epochs=epochs, steps_per_epoch=steps)


def train_ours(dataset: str, epochs: int, steps: int, model_dir: str, extra: list[str], name: str = "ours") -> dict:
    flags = [f"--{name.replace('_', '-')}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
             for name, value in SETTINGS.items()]
    command = [sys.executable, str(ROOT / "entry_point" / "train.py"), "--data-uri", dataset, "--output-uri",
               f"s3://{BUCKET}/runs", "--run-name", name, "--epochs", str(epochs), "--steps-per-epoch", str(steps),
               *flags, *extra]
    started = time.perf_counter()
    cache = Path(model_dir) / "cache"  # empty: the run's reads start cold, as on a fresh instance
    child = subprocess.run(command, capture_output=True, text=True,
                           env=dict(os.environ, SM_MODEL_DIR=model_dir, BRAINSEG_CACHE_DIR=str(cache)))
    if child.returncode != 0:
        raise RuntimeError(f"our run failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    saved = torch.load(Path(model_dir) / "model.pt", weights_only=True)
    description = saved["description"]
    return {"wall_seconds": round(time.perf_counter() - started, 1), "weights": saved["state_dict"],
            "postprocessing": rules_of(description.get("postprocessing", {})), "network": description["network"],
            "patch_size": tuple(description["patch_size"]), "target_spacing": tuple(description["target_spacing"])}


def _member(run: dict, hp: Hyperparameters) -> tuple:
    """One of our trained models as :func:`score_cases` takes it: its own network, patch and grid."""
    spec = NetworkSpec(**run["network"])
    model = build_model(spec)
    model.load_state_dict(run["weights"])
    return model, dataclasses.replace(hp, patch_size=run["patch_size"], channels=spec.channels), "ours", \
        run["target_spacing"]


def _volumes(cases) -> list[dict]:
    """Each case's raw channels ``(4, D, H, W)`` and label values ``(1, D, H, W)``, in memory."""
    out = []
    for case in cases:
        depth, rows, columns = case.image.shape
        images, mask = read_case_region(case, (0, depth, 0, rows, 0, columns))
        out.append({"image": np.stack(images), "label": mask[None].astype(np.uint8), "case": case})
    return out


def _monai_to_ours(label: torch.Tensor) -> torch.Tensor:
    """ConvertToMultiChannelBasedOnBratsClasses gives TC, WT, ET; our regions are WT, TC, ET."""
    return label[:, [1, 0, 2]]


def train_monai(train, val, hp: Hyperparameters, spacing: tuple = ()) -> dict:
    """MONAI's BraTS-tutorial pipeline on volumes in memory; validation (native volumes) inferred
    on the ``spacing`` grid the training volumes were resampled to (``()``: none)."""
    started = time.perf_counter()
    keys = ["image", "label"]
    transform = Compose([
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=hp.patch_size, pos=1, neg=1, num_samples=4),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys="image", factors=0.1, prob=1.0), RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
    ])
    transform.set_random_state(seed=hp.seed)
    dataset = CacheDataset([{"image": v["image"].astype(np.float32), "label": v["label"]} for v in train], transform,
                           num_workers=2, progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=2)  # 4 crops per volume: 4 patches
    torch.manual_seed(hp.seed)
    model = build_model(NetworkSpec.of(hp, len(REGIONS)))
    optimizer = build_optimizer(model.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)
    total = hp.epochs * hp.steps_per_epoch
    scheduler = build_scheduler(optimizer, hp.schedule, hp.lr, hp.warmup_steps, total)
    loss_function = DiceCELoss(sigmoid=True)
    best, best_weights, step = -1.0, None, 0
    # hp.batch_size patches per step, as ours: each loader item carries 4 crops of one volume.
    for _ in range(hp.epochs):
        model.train()
        done = 0
        while done < hp.steps_per_epoch:
            for item in loader:
                for start in range(0, item["image"].shape[0], hp.batch_size):
                    image = item["image"][start:start + hp.batch_size].as_tensor().float()
                    target = _monai_to_ours(item["label"][start:start + hp.batch_size].as_tensor().float())
                    optimizer.zero_grad()
                    loss = loss_function(model(image), target)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    done += 1
                    step += 1
                    if done >= hp.steps_per_epoch:
                        break
                if done >= hp.steps_per_epoch:
                    break
        dice = float(np.mean([score["dice_mean"] for score in score_cases([(model, hp, "monai", spacing)], val)]))
        if dice > best:
            best, best_weights = dice, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"wall_seconds": round(time.perf_counter() - started, 1), "weights": best_weights, "steps": step}


def _normalised(volume: dict, pipeline: str, hp: Hyperparameters) -> np.ndarray:
    """The network input the pipeline trained on: ours per-sequence z-score of body statistics,
    MONAI's channel-wise z-score over non-zero voxels."""
    if pipeline == "ours":
        return np.stack([normalize(channel.astype(np.float32), hp.normalization, stats)
                         for channel, stats in zip(volume["image"], volume["case"].summary.intensities)])
    out = np.zeros_like(volume["image"], dtype=np.float32)
    for index, channel in enumerate(volume["image"].astype(np.float32)):
        inside = channel != 0
        out[index][inside] = (channel[inside] - channel[inside].mean()) / max(channel[inside].std(), 1e-8)
    return out


def _lesions(truth_wt: np.ndarray, label: np.ndarray):
    """``(voxels, kind)`` per connected whole-tumour lesion."""
    components, count = ndimage.label(truth_wt)
    for index in range(1, count + 1):
        voxels = components == index
        yield voxels, "enhancing" if (label[voxels] == 4).any() else "non-enhancing"


def score_cases(members: list[tuple], volumes, rules: dict | None = None) -> list[dict]:
    """Test figures per case of one model or an ensemble: ``members`` are ``(model, hp, pipeline,
    spacing)``, each inferred on its ``spacing`` grid (ours' target spacing; ``()``: native) with its
    ``hp``'s patch, the sigmoid probabilities averaged on the native grid; ``rules``: postprocessing
    per region."""
    modes = [model.training for model, *_ in members]
    for model, *_ in members:
        model.eval()
    scores = []
    with torch.no_grad():
        for volume in volumes:
            case = volume["case"]
            total = 0
            for model, hp, pipeline, spacing in members:
                grid = Grid(case.image.shape, case.image.spacing, spacing or case.image.spacing,
                            hp.resampling if pipeline == "ours" else "linear")  # MONAI's Spacingd: linear
                image = torch.from_numpy(grid.volume_to_target(_normalised(volume, pipeline, hp)))[None]
                total = total + torch.sigmoid(grid.volume_to_native(sliding_window_inference(
                    image, roi_size=hp.patch_size, sw_batch_size=2, predictor=model, overlap=0.25, mode="gaussian")[0]))
            predicted = (total / len(members) > 0.5).numpy()
            if rules:
                predicted = np.stack(apply_rules(rules, REGIONS, list(predicted), case.image.spacing))
            label = volume["label"][0]
            truth = np.stack([np.isin(label, [1, 2, 4]), np.isin(label, [1, 4]), label == 4])
            row = {"case_id": volume["case"].case_id}
            for index, name in enumerate(REGIONS):
                row[f"dice_{name}"] = Overlap.of(predicted[index], truth[index]).dice
                row[f"lesion_dice_{name}"] = lesion_wise(predicted[index], truth[index], case.image.spacing).dice
                if predicted[index].any() and truth[index].any():
                    row[f"hd95_{name}"] = float(compute_hausdorff_distance(
                        torch.from_numpy(predicted[index])[None, None].float(),
                        torch.from_numpy(truth[index])[None, None].float(), percentile=95,
                        spacing=list(volume["case"].image.spacing)).item())
            row["dice_mean"] = float(np.mean([row[f"dice_{name}"] for name in REGIONS]))
            row["lesions"] = [{"kind": kind, "detected": bool(predicted[0][voxels].mean() >= DETECTED_FRACTION),
                               "voxels": int(voxels.sum())} for voxels, kind in _lesions(truth[0], label)]
            scores.append(row)
    for (model, *_), mode in zip(members, modes):
        model.train(mode)
    return scores


def summarise(scores: list[dict]) -> dict:
    out = {}
    for name in REGIONS:
        out[f"dice_{name}"] = round(float(np.mean([s[f"dice_{name}"] for s in scores])), 4)
        distances = [s[f"hd95_{name}"] for s in scores if f"hd95_{name}" in s]
        out[f"hd95_{name}_mm"] = round(float(np.median(distances)), 2) if distances else None
        out[f"{name}_cases_with_both_present"] = len(distances)
    out["dice_mean"] = round(float(np.mean([s["dice_mean"] for s in scores])), 4)
    for name in REGIONS:
        out[f"lesion_dice_{name}"] = round(float(np.mean([s[f"lesion_dice_{name}"] for s in scores])), 4)
    out["lesion_dice_mean"] = round(float(np.mean([out[f"lesion_dice_{name}"] for name in REGIONS])), 4)
    lesions = [lesion for s in scores for lesion in s["lesions"]]
    for kind in ("enhancing", "non-enhancing"):
        of_kind = [lesion for lesion in lesions if lesion["kind"] == kind]
        out[f"{kind}_lesions_detected"] = f"{sum(lesion['detected'] for lesion in of_kind)}/{len(of_kind)}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--shape", default="48,96,96")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--thickness", default="1", help="slice thickness factors drawn per case (1: every case "
                        "at the same spacing, where both pipelines see the same grid)")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (other studies, same kinds)")
    parser.add_argument("--ours-flag", action="append", default=[], help="a train.py flag for our run only, "
                        "e.g. --ours-flag=--plan=auto (repeatable)")
    parser.add_argument("--folds", type=int, default=0, help="also train ours on each of N cross-validation folds "
                        "and score fold 0 alone and the N as an ensemble (N > 1)")
    parser.add_argument("--skip-monai", action="store_true", help="train and score only our pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer.json")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    hp = _hp(args.epochs, args.steps)
    torch.set_num_threads(os.cpu_count() or 1)
    with EmbeddedS3() as server, tempfile.TemporaryDirectory() as model_dir:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.client().create_bucket(Bucket=BUCKET)
        dataset = f"s3://{BUCKET}/brats/"
        thicknesses = tuple(int(v) for v in args.thickness.split(","))
        write_dataset(args.cases, dataset, SynthSpec(shape=shape, sequences=SEQUENCES, thicknesses=thicknesses,
                                                         seed=args.seed), jobs=2)
        indexing = time.perf_counter()  # once per dataset, before either pipeline (both use its catalog)
        catalog = build_catalog(dataset, sequences=SEQUENCES, seed=hp.seed)
        index_seconds = round(time.perf_counter() - indexing, 1)
        print(f"# dataset indexed in {index_seconds} s", flush=True)
        ours = train_ours(dataset, args.epochs, args.steps, model_dir, args.ours_flag)
        print(f"# ours trained in {ours['wall_seconds']} s", flush=True)
        folds = [train_ours(dataset, args.epochs, args.steps, str(Path(model_dir) / f"fold{fold}"),
                            [*args.ours_flag, f"--fold={fold}", f"--folds={args.folds}"], f"ours-fold{fold}")
                 for fold in range(args.folds if args.folds > 1 else 0)]
        loading = time.perf_counter()
        train, val, test = (_volumes(catalog.split(name)) for name in ("train", "val", "test"))
        load_seconds = time.perf_counter() - loading
        member = lambda run: _member(run, hp)
        shared = common_rules([fold["postprocessing"] for fold in folds])
        entries = [("ours", [member(ours)], None, ours), ("ours+pp", [member(ours)], ours["postprocessing"], ours)]
        if folds:
            ensemble = {"wall_seconds": round(sum(fold["wall_seconds"] for fold in folds), 1)}
            entries += [("ours-fold0", [member(folds[0])], None, folds[0]),
                        (f"ours-{len(folds)}-fold-ensemble", [member(fold) for fold in folds], None, ensemble),
                        (f"ours-{len(folds)}-fold-ensemble+pp", [member(fold) for fold in folds], shared, ensemble)]
        if not args.skip_monai:
            monai = train_monai(train, val, hp)
            monai["wall_seconds"] = round(monai["wall_seconds"] + load_seconds, 1)
            print(f"# monai trained in {monai['wall_seconds']} s (volumes read in {load_seconds:.1f} s)", flush=True)
            model = build_model(NetworkSpec.of(hp, len(REGIONS)))
            model.load_state_dict(monai["weights"])
            entries.append(("monai", [(model, hp, "monai", ())], None, monai))
        results = {name: {"wall_seconds": run["wall_seconds"], **summarise(per_case), "per_case": per_case}
                   for name, members, rules, run in entries
                   for per_case in [score_cases(members, test, rules)]}
    report = {"cases": args.cases, "shape": shape, "thickness": args.thickness, "seed": args.seed,
              "ours_flags": args.ours_flag,
              "postprocessing": {name: rule.describe() for name, rule in ours["postprocessing"].items()}, "split": {name: len(catalog.split(name))
                                                             for name in ("train", "val", "test")},
              "epochs": args.epochs, "steps_per_epoch": args.steps, "settings": hp.to_dict(),
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "index_seconds": index_seconds,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    columns = [key for key in results["ours"] if key != "per_case"]
    print("| pipeline | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, figures in results.items():
        print(f"| {name} | " + " | ".join(str(figures[key]) for key in columns) + " |")
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
