"""The benchmarks' scorer: one code path for every pipeline, on each study's own grid.

A :class:`Member` is a trained network, the window it infers with, how it turns a study's raw
channels into its input, and the grid it works on. A study is inferred on that grid by sliding
windows (Gaussian, overlap 0.25), its sigmoid probabilities mapped back to the study's grid and
averaged over the members, and turned into regions as the pipeline does it (``decide``: a 0.5
threshold per channel unless the pipeline says otherwise); ``rules``
(``{region: brainseg.postprocess.Rule}``) are applied when given. Per study and region: Dice, HD95 (MONAI's, where both are present) and BraTS's lesion-wise Dice and false
positives (:func:`brainseg.metrics.lesion_wise`, checked against the challenge's published code,
docs/training.md).

Lesions are counted independently of the lesion-wise rules: each 26-connected component of the
true whole tumour larger than BraTS's 50 mm³ floor is a lesion, *found* when the predicted whole
tumour covers at least half of it (and *detected* when it covers any of it). It is binned by size (under 2 ml, 2-10 ml, 10 ml and more), by
BraTS type (enhancing: it holds an enhancing voxel; else non-enhancing) and, where the generator
recorded one (``lesions``, ``types``), by the generator's lesion type (e.g. flair-only). Each
lesion also records the share of it *covered* and a *local Dice*: the predicted whole tumour
against the lesion within 5 mm of it, which falls when a lesion is missed and when the prediction
floods its surroundings (where *found* would still count it). False positive components are
counted per region, before any postprocessing and after it, and so are the predicted and true
volumes and the predicted volume outside the true region (what a flood adds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from brainseg.data.resample import Grid
from brainseg.metrics import MIN_LESION_MM3, hausdorff95, lesion_wise
from brainseg.overlap import Overlap
from brainseg.postprocess import apply_rules

REGIONS = ("wt", "tc", "et")  # the sigmoid channels' order
FOUND_FRACTION = 0.5
LOCAL_MARGIN_MM = 5.0
SIZE_BINS = ((0.0, 2.0, "under 2 ml"), (2.0, 10.0, "2-10 ml"), (10.0, float("inf"), "10 ml and more"))
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)


def truth_regions(label: np.ndarray) -> np.ndarray:
    """WT, TC, ET of BraTS labels (1 necrosis/non-enhancing, 2 oedema, 4 enhancing) ``(3, D, H, W)``."""
    return np.stack([np.isin(label, [1, 2, 4]), np.isin(label, [1, 4]), label == 4])


@dataclass(frozen=True)
class Member:
    """A trained network as the scorer runs it: ``normalise`` takes a study dict to the network's
    input ``(C, D, H, W)``; ``spacing`` is its grid (``()``: each study's own), reached by ``resampling``;
    its output is averaged over the mirrored copies ``flips`` (axes of the batched input, as
    :data:`brainseg.prediction.predictor.MIRROR_FLIPS`; ``((),)``: none)."""

    model: torch.nn.Module
    patch_size: tuple
    normalise: Callable[[dict], np.ndarray]
    spacing: tuple = ()
    resampling: str = "linear"
    flips: tuple = ((),)


def threshold(probabilities: np.ndarray) -> np.ndarray:
    """Each sigmoid channel on its own, at 0.5."""
    return probabilities > 0.5


def _window(member: Member, inputs: torch.Tensor, axes: tuple) -> torch.Tensor:
    """The member's sliding-window output ``(C, D, H, W)`` on ``inputs`` mirrored on ``axes``, mirrored back."""
    flipped = inputs.flip(axes) if axes else inputs
    output = sliding_window_inference(flipped, roi_size=member.patch_size, sw_batch_size=2, predictor=member.model,
                                      overlap=0.25, mode="gaussian")
    return (output.flip(axes) if axes else output)[0]


def probabilities(members: list[Member], study: dict) -> np.ndarray:
    """The members' mean sigmoid output ``(3, D, H, W)`` on the study's grid."""
    total = 0
    for member in members:
        grid = Grid(study["label"].shape, study["spacing"], member.spacing or study["spacing"], member.resampling)
        inputs = torch.from_numpy(grid.volume_to_target(member.normalise(study)))[None]
        output = sum(_window(member, inputs, axes) for axes in member.flips) / len(member.flips)
        total = total + torch.sigmoid(grid.volume_to_native(output))
    return (total / len(members)).numpy()


def lesions_of(label: np.ndarray, spacing: tuple, numbers: np.ndarray | None = None, types: tuple = ()):
    """``(voxels, facts)`` per scored true lesion: ``facts`` has ``ml``, ``size``, ``brats_type`` and
    (with the generator's ``numbers`` and ``types``) ``type``, the type of the lesion most of it is."""
    components, count = ndimage.label(label > 0, _COMPONENTS)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        voxels = np.zeros(label.shape, dtype=bool)
        voxels[box] = components[box] == index
        ml = float(voxels.sum()) * voxel_ml
        if ml * 1000.0 <= MIN_LESION_MM3:
            continue
        facts = {"ml": round(ml, 3), "size": next(name for low, high, name in SIZE_BINS if low <= ml < high),
                 "brats_type": "enhancing" if (label[voxels] == 4).any() else "non-enhancing"}
        if numbers is not None:
            inside = numbers[voxels]
            inside = inside[inside > 0]
            if inside.size:
                facts["type"] = types[int(np.bincount(inside).argmax()) - 1]
        yield voxels, facts


def local_dice(predicted: np.ndarray, voxels: np.ndarray, spacing: tuple) -> float:
    """Dice of ``predicted`` against the lesion ``voxels`` within ``LOCAL_MARGIN_MM`` of the lesion."""
    reach = [int(np.ceil(LOCAL_MARGIN_MM / mm)) + 1 for mm in spacing]
    where = np.argwhere(voxels)
    box = tuple(slice(max(0, low - r), min(n, high + r + 1))
                for low, high, r, n in zip(where.min(0), where.max(0), reach, voxels.shape))
    lesion = voxels[box]
    near = ndimage.distance_transform_edt(~lesion, sampling=spacing) <= LOCAL_MARGIN_MM
    hits = predicted[box] & lesion
    return float(2.0 * hits.sum() / ((predicted[box] & near).sum() + lesion.sum()))


def score_study(predicted: np.ndarray, label: np.ndarray, spacing: tuple, numbers: np.ndarray | None = None,
                types: tuple = ()) -> dict:
    """One study's figures from its thresholded regions ``predicted`` ``(3, D, H, W)``."""
    truth = truth_regions(label)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    row = {}
    for index, name in enumerate(REGIONS):
        row[f"dice_{name}"] = Overlap.of(predicted[index], truth[index]).dice
        row[f"predicted_ml_{name}"] = round(float(predicted[index].sum()) * voxel_ml, 3)
        row[f"true_ml_{name}"] = round(float(truth[index].sum()) * voxel_ml, 3)
        row[f"outside_ml_{name}"] = round(float((predicted[index] & ~truth[index]).sum()) * voxel_ml, 3)
        scores = lesion_wise(predicted[index], truth[index], spacing)
        row[f"lesion_dice_{name}"] = scores.dice
        row[f"false_positives_{name}"] = scores.false_positives
        if predicted[index].any() and truth[index].any():
            row[f"hd95_{name}"] = hausdorff95(predicted[index], truth[index], spacing)
    row["dice_mean"] = float(np.mean([row[f"dice_{name}"] for name in REGIONS]))
    row["lesions"] = [lesion_record(predicted[0], voxels, facts, spacing)
                      for voxels, facts in lesions_of(label, spacing, numbers, types)]
    return row


def lesion_record(whole_tumour: np.ndarray, voxels: np.ndarray, facts: dict, spacing: tuple) -> dict:
    """One true lesion's ``facts`` with the share of it the predicted whole tumour covers, whether
    that finds it or detects it, and its local Dice."""
    covered = float(whole_tumour[voxels].mean())
    return {**facts, "covered": round(covered, 4), "found": covered >= FOUND_FRACTION,
            "detected": bool(whole_tumour[voxels].any()),
            "local_dice": round(local_dice(whole_tumour, voxels, spacing), 4)}


def score_cases(members: list[Member], studies: list[dict], rules: dict | None = None,
                decide: Callable[[np.ndarray], np.ndarray] = threshold) -> dict[str, list[dict]]:
    """Per-study figures of one model or an ensemble on ``studies`` (each ``image`` ``(4, D, H, W)``
    raw, ``label``, ``spacing``, ``case_id``, optionally ``lesions`` and ``types``): ``raw`` as
    ``decide`` turns the probabilities into regions and, with ``rules``, ``postprocessed``."""
    models = [member.model for member in members]
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    rows = {"raw": []} if not rules else {"raw": [], "postprocessed": []}
    try:
        with torch.no_grad():
            for study in studies:
                raw = decide(probabilities(members, study))
                kept = {"raw": raw}
                if rules:
                    kept["postprocessed"] = np.stack(apply_rules(rules, REGIONS, list(raw), study["spacing"]))
                for name, predicted in kept.items():
                    rows[name].append({"case_id": study["case_id"], **score_study(
                        predicted, study["label"], study["spacing"], study.get("lesions"), study.get("types", ()))})
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return rows


def found(lesions: list[dict], key: str, value: str, outcome: str = "found") -> str:
    """``"found/total"`` (or ``outcome``, e.g. ``detected``) of the lesions whose ``key`` is ``value``."""
    chosen = [lesion for lesion in lesions if lesion.get(key) == value]
    return f"{sum(lesion[outcome] for lesion in chosen)}/{len(chosen)}"


def summarise(rows: list[dict]) -> dict:
    """Set-level figures: mean Dice, lesion-wise Dice and false positives per study per region,
    median HD95, and lesions found overall and per size and type."""
    out = {}
    for name in REGIONS:
        out[f"dice_{name}"] = round(float(np.mean([row[f"dice_{name}"] for row in rows])), 4)
        distances = [row[f"hd95_{name}"] for row in rows if f"hd95_{name}" in row]
        out[f"hd95_{name}_mm"] = round(float(np.median(distances)), 2) if distances else None
    out["dice_mean"] = round(float(np.mean([row["dice_mean"] for row in rows])), 4)
    for name in REGIONS:
        out[f"lesion_dice_{name}"] = round(float(np.mean([row[f"lesion_dice_{name}"] for row in rows])), 4)
    out["lesion_dice_mean"] = round(float(np.mean([out[f"lesion_dice_{name}"] for name in REGIONS])), 4)
    for name in REGIONS:
        out[f"false_positives_per_study_{name}"] = round(float(np.mean([row[f"false_positives_{name}"] for row in rows])), 3)
    for name in REGIONS:  # set totals, as "predicted / true volume over the test set"
        for volume in ("predicted", "true", "outside"):
            out[f"{volume}_ml_{name}"] = round(float(sum(row[f"{volume}_ml_{name}"] for row in rows)), 1)
    lesions = [lesion for row in rows for lesion in row["lesions"]]
    out["lesions_found"] = f"{sum(lesion['found'] for lesion in lesions)}/{len(lesions)}"
    out["lesions_detected"] = f"{sum(lesion['detected'] for lesion in lesions)}/{len(lesions)}"
    for _, _, size in SIZE_BINS:
        out[f"found_{size}"] = found(lesions, "size", size)
        out[f"detected_{size}"] = found(lesions, "size", size, "detected")
    for kind in ("enhancing", "non-enhancing"):
        out[f"found_{kind}"] = found(lesions, "brats_type", kind)
    for kind in sorted({lesion["type"] for lesion in lesions if "type" in lesion}):
        out[f"found_type_{kind}"] = found(lesions, "type", kind)
        out[f"local_dice_type_{kind}"] = round(float(np.mean(
            [lesion["local_dice"] for lesion in lesions if lesion.get("type") == kind])), 4)
    return out


def pooled(summaries: list[dict]) -> dict:
    """Several benchmark runs (seeds) as one: figures averaged, lesion counts added."""
    out = {}
    for key in dict.fromkeys(key for summary in summaries for key in summary):
        values = [summary.get(key) for summary in summaries]
        if key.startswith(("found", "detected", "lesions_found", "lesions_detected")):
            parts = [(value or "0/0").split("/") for value in values]
            out[key] = f"{sum(int(a) for a, _ in parts)}/{sum(int(b) for _, b in parts)}"
        elif all(isinstance(value, (int, float)) for value in values):
            out[key] = round(float(np.mean(values)), 4)
    return out
