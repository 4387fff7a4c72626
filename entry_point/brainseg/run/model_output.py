"""What a run publishes as its model: the description written beside the kept weights (network,
sequences, labels, grid, normalisation, postprocessing chosen on validation, provenance) and
SageMaker's model directory."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from brainseg.config import Hyperparameters
from brainseg.data.resample import TargetSpacing
from brainseg.detection import Threshold
from brainseg.model.artifact import write_model_dir
from brainseg.model.description import ModelDescription
from brainseg.model.networks import NetworkSpec
from brainseg.run.state import CODE_ROOT, LoopState, code_version


def describe(hp: Hyperparameters, out_channels: int, target_spacing: TargetSpacing, run_name: str,
             fingerprint: str, state: LoopState, postprocessing: dict, detection: Threshold | None = None
             ) -> ModelDescription:
    """What the kept weights need to be run on new studies; ``postprocessing`` is
    ``{structure: brainseg.postprocess.Choice}`` (a choice that changes nothing is not recorded),
    ``detection`` the tumour-present threshold chosen on validation (none before it is chosen)."""
    return ModelDescription(
        network=dataclasses.asdict(NetworkSpec.of(hp, out_channels)), task=hp.task,
        sequences=hp.sequence_names, labels=hp.labels, regions=hp.regions, target_spacing=target_spacing.spacing,
        resampling=target_spacing.resampling, normalization=hp.normalization, patch_size=hp.patch_size, sw_overlap=hp.sw_overlap,
        missing_sequences=hp.missing_sequences, run_name=run_name, code_version=code_version(),
        dataset_fingerprint=fingerprint, best_epoch=state.best_epoch, kept_epoch=state.kept_epoch,
        best_validation=state.best_metric if math.isfinite(state.best_metric) else None,
        postprocessing={name: choice.rule.to_dict() for name, choice in postprocessing.items()
                        if not choice.rule.changes_nothing},
        detection=detection.to_dict() if detection else {})


def write_model_output(model_dir: str, description: ModelDescription, weights: dict, hp: Hyperparameters) -> None:
    """SageMaker's model directory: the weights, their description, the inference code and the
    run's hyperparameters."""
    write_model_dir(Path(model_dir), description, weights, CODE_ROOT)
    (Path(model_dir) / "hyperparameters.json").write_text(json.dumps(hp.to_dict(), indent=1))
