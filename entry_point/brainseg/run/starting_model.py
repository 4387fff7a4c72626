"""The model a run starts from: built from the hyperparameters, optionally initialised from another
run's weights (``--init-weights``) with its encoder frozen (``--freeze-encoder``); and the encoder
file a pretraining run writes for later runs to start from."""

from __future__ import annotations

import io
import logging

import torch

from brainseg.config import Hyperparameters
from brainseg.model.networks import NetworkSpec, build_model, encoder_state, freeze_encoder, load_matching
from brainseg.run.errors import TrainingError
from brainseg.run.state import read_weights

logger = logging.getLogger("brainseg.train")


def starting_model(hp: Hyperparameters, out_channels: int, device: torch.device) -> torch.nn.Module:
    """The network of ``hp`` on ``device``, before any training step of this run.

    Raises:
        TrainingError: the network cannot be built, or ``init_weights`` matches none of its layers.
    """
    try:
        model = build_model(NetworkSpec.of(hp, out_channels)).to(device)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    if hp.init_weights:
        report = load_matching(model, read_weights(hp.init_weights))
        if not report["loaded"]:
            raise TrainingError(f"init_weights {hp.init_weights}: no layer matches model {hp.model} with "
                                f"channels {hp.channels} ({len(report['unexpected'])} unexpected, "
                                f"{len(report['shape_mismatch'])} of another shape)")
        logger.info("init_weights %s: loaded %d tensors; not matched: %d of another shape %s, %d unknown to "
                    "this model, %d of the model left as initialised", hp.init_weights, len(report["loaded"]),
                    len(report["shape_mismatch"]), report["shape_mismatch"][:3], len(report["unexpected"]),
                    len(report["missing"]))
    if hp.freeze_encoder:
        frozen, trainable = freeze_encoder(model, hp.model)
        logger.info("encoder frozen: %d parameter tensors frozen, %d trainable", frozen, trainable)
    return model


def encoder_bytes(model: torch.nn.Module, hp: Hyperparameters) -> bytes:
    """The encoder's weights with the architecture they fit (what ``--init-weights`` reads back)."""
    buffer = io.BytesIO()
    torch.save({"encoder": encoder_state(model, hp.model), "model_name": hp.model, "channels": list(hp.channels)},
               buffer)
    return buffer.getvalue()

