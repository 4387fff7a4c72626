"""From a case's channels to each structure's predicted voxels on its native grid.

For every model of the ensemble: the channels normalised as that model was trained, resampled to
its target spacing, inferred by sliding window with Gaussian blending (optionally also on the 7
mirrored copies, flipped back: test-time augmentation), turned into probabilities (softmax or
sigmoid), interpolated back onto the native grid. The models' probabilities are averaged there and
thresholded by the label scheme, and each structure's postprocessing chosen on validation
(:mod:`brainseg.postprocess`) is applied when every model of the ensemble chose the same rule.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainseg.data.resample import TargetSpacing
from brainseg.data.summary import Intensity
from brainseg.data.transforms import normalize
from brainseg.detection import Threshold
from brainseg.io import s3
from brainseg.model.artifact import LoadedModel, ModelError
from brainseg.model.description import ModelDescription
from brainseg.model.inferer import sliding_window
from brainseg.postprocess import Rule, apply_rules, common_rules, rules_of

MIRROR_FLIPS = tuple(axes for count in range(4) for axes in itertools.combinations((2, 3, 4), count))


def compatible(descriptions: list[ModelDescription], sources: list[str]) -> ModelDescription:
    """The ensemble's shared description: every model segments, from the same sequences into the
    same structures (their grids, networks and normalisations may differ).

    Raises:
        ModelError: naming the first model that differs and how.
    """
    first = descriptions[0]
    for description, source in zip(descriptions, sources):
        if description.task != "segmentation":
            raise ModelError(f"model {source} is a {description.task} model; only a segmentation model predicts")
        for name in ("sequences", "labels", "regions"):
            if getattr(description, name) != getattr(first, name):
                raise ModelError(f"model {source}: {name} {getattr(description, name)!r} differ from "
                                 f"{getattr(first, name)!r} of model {sources[0]}; an ensemble needs models of "
                                 "the same sequences and structures")
    return first


@dataclass
class Prediction:
    """Each structure's predicted voxels ``(D, H, W)`` (booleans) and probability, on the native grid."""

    masks: list
    probabilities: np.ndarray


class Predictor:
    """An ensemble of one or more models run on whole cases.

    Args:
        models: loaded models of :func:`compatible` descriptions.
        device: where the networks run.
        mirror: average over the 8 mirrorings of every axis (8 times the compute).
        sw_batch_size: windows per forward pass.
        overlap: sliding-window overlap; ``None``: each model's own (its training's).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast.
        postprocess: apply the models' postprocessing (:func:`shared_rules`), or ``rules``.
        rules: ``{structure: Rule}`` to apply instead of the models' own (a cross-validation's
            pooled choice, :func:`pooled_choices`).
        detection: the tumour-present threshold to use instead of the models' own
            (:func:`shared_threshold`; a cross-validation's pooled one).
    """

    def __init__(self, models: list[LoadedModel], device: torch.device, mirror: bool = False,
                 sw_batch_size: int = 2, overlap: float | None = None, precision: str = "fp32",
                 postprocess: bool = True, rules: dict | None = None, detection: Threshold | None = None):
        if not models:
            raise ModelError("no model given")
        self.models = models
        self.description = compatible([m.description for m in models], [m.source for m in models])
        self.scheme = self.description.scheme
        self.device = device
        self.flips = MIRROR_FLIPS if mirror else ((),)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.precision = precision
        self.rules = {} if not postprocess else shared_rules(models) if rules is None else rules
        self.detection = detection or shared_threshold(models)
        unknown = sorted(set(self.rules) - set(self.scheme.names))
        if unknown:
            raise ModelError(f"postprocessing for {', '.join(unknown)}: the models' structures are "
                             f"{', '.join(self.scheme.names)}")

    def predict(self, channels: list[np.ndarray], intensities: tuple[Intensity, ...], spacing: tuple) -> Prediction:
        """The structures of one case from its raw channels (modality units, ``(D, H, W)`` each, in
        the models' sequence order), each channel's intensity statistics and the voxel spacing."""
        shape = channels[0].shape
        total = None
        for loaded in self.models:
            description = loaded.description
            image = np.stack([normalize(channel, description.normalization, stats)
                              for channel, stats in zip(channels, intensities)])
            grid = TargetSpacing(description.target_spacing, description.resampling).grid(shape, spacing)
            output = sliding_window(loaded.network, grid.volume_to_target(image), description.patch_size,
                                    description.sw_overlap if self.overlap is None else self.overlap,
                                    self.sw_batch_size, self.precision, self.device, self.flips)
            probabilities = torch.sigmoid(output) if self.scheme.sigmoid else torch.softmax(output, 0)
            native = grid.volume_to_native(probabilities).numpy()
            total = native if total is None else total + native
        probabilities = total / len(self.models)
        masks = apply_rules(self.rules, self.scheme.names, self.scheme.predicted(probabilities, probabilities=True),
                            spacing)
        return Prediction(masks, probabilities)


def shared_rules(models: list[LoadedModel]) -> dict[str, Rule]:
    """Each structure's postprocessing rule that every model of the ensemble chose (a structure
    whose models chose differently, or nothing, is left as predicted).

    Raises:
        ModelError: a model's description holds something that is not a rule.
    """
    try:
        chosen = [rules_of(loaded.description.postprocessing) for loaded in models]
    except ValueError as err:
        raise ModelError(str(err)) from None
    return common_rules(chosen)


def shared_threshold(models: list[LoadedModel]) -> Threshold:
    """The ensemble's tumour-present threshold (:mod:`brainseg.detection`): its one model's, or the
    median of its models' (a model from before detection counts as 0 ml)."""
    try:
        thresholds = [Threshold.from_dict(loaded.description.detection) if loaded.description.detection else Threshold()
                      for loaded in models]
    except ValueError as err:
        raise ModelError(f"a model's detection threshold is damaged: {err}") from None
    if len(thresholds) == 1:
        return thresholds[0]
    return Threshold(float(np.median([threshold.ml for threshold in thresholds])),
                     f"the median of {len(thresholds)} models' thresholds")


def pooled_choices(location: str) -> tuple[dict[str, Rule], Threshold | None]:
    """The postprocessing a cross-validation chose on its folds' pooled validation cases, and its
    tumour-present threshold chosen there (``None`` where it has none), from its ``<name>-cv.json``
    (``s3://`` or a path).

    Raises:
        ModelError: nothing there, not JSON, no pooled choice in it (its note says why), or a
            damaged threshold.
    """
    try:
        data = s3.read_uri(location) if location.startswith("s3://") else Path(location).read_bytes()
    except OSError as err:
        raise ModelError(f"postprocessing {location}: cannot be read ({err.strerror or err})") from None
    if data is None:
        raise ModelError(f"postprocessing {location}: no such object")
    try:
        summary = json.loads(data)
    except ValueError:
        raise ModelError(f"postprocessing {location}: not JSON; expected a cross-validation's <name>-cv.json") from None
    rules = summary.get("postprocessing_rules") if isinstance(summary, dict) else None
    if not isinstance(rules, dict):
        note = summary.get("postprocessing_note") if isinstance(summary, dict) else None
        raise ModelError(f"postprocessing {location}: expected a cross-validation summary with postprocessing_rules"
                         + (f" ({note})" if note else "")) from None
    try:
        return rules_of(rules), Threshold.from_dict(summary["detection"]) if "detection" in summary else None
    except ValueError as err:
        raise ModelError(f"postprocessing {location}: {err}") from None
