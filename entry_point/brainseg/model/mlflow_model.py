"""A trained model as an MLflow model (pyfunc flavour), so a model registry can take it.

The logged model holds brainseg's own ``model.pt`` and ``model.json`` as artifacts (loaded with
``torch.load(weights_only=True)``: the MLflow model pickles no network), the ``brainseg`` package
as code, the description as the model's metadata (``brainseg``), and a tensor signature.
``predict`` takes a batch of volumes already prepared as the network saw them (the sequences
stacked in the description's order, normalised, on the target grid) ``(N, C, D, H, W)`` float32,
and returns each structure's probability ``(N, S, D, H, W)`` by Gaussian sliding windows
(sigmoid per region, or softmax without the background channel per class).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from brainseg.model.artifact import DESCRIPTION_FILE, MODEL_FILE, load_model
from brainseg.model.description import ModelDescription
from brainseg.model.inferer import sliding_window

ARTIFACT_PATH = "model"


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a brainseg model."""

    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_model(context.artifacts["model"], self.device)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        description = self.loaded.description
        scheme = description.scheme
        volumes = np.asarray(model_input, dtype=np.float32)
        outputs = []
        for volume in volumes:
            logits = sliding_window(self.loaded.network, volume, tuple(description.patch_size), description.sw_overlap,
                                    2, "fp32", self.device)
            probabilities = torch.sigmoid(logits) if scheme.sigmoid else torch.softmax(logits, 0)[1:]
            outputs.append(probabilities.numpy())
        return np.stack(outputs)


def signature(description: ModelDescription) -> ModelSignature:
    channels, structures = len(description.sequences), len(description.scheme.names)
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, structures, -1, -1, -1))]))


def log_model(model_dir: Path, description: ModelDescription, code_root: Path) -> str:
    """Log ``model_dir``'s model to the active MLflow run; returns the model's URI."""
    requirements = [line.strip() for line in (code_root / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    info = mlflow.pyfunc.log_model(
        name=ARTIFACT_PATH, python_model=SegmentationModel(), code_paths=[str(code_root / "brainseg")],
        artifacts={"model": str(model_dir / MODEL_FILE), "description": str(model_dir / DESCRIPTION_FILE)},
        signature=signature(description), metadata={"brainseg": description.to_dict()},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", *requirements])
    return info.model_uri
