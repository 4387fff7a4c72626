"""One factory for the MONAI 3D networks a run can train, and which of their layers form the encoder.

Every network maps ``(N, 1, D, H, W)`` images to ``(N, C, D, H, W)`` logits: two classes
(background, tumour) for segmentation, one channel (the reconstructed image) for the autoencoder.
Each level of ``channels`` halves the resolution, so patch sizes must divide by ``2**(levels-1)``.
"""

from __future__ import annotations

import re

import torch
from monai.networks.nets import AttentionUnet, DynUNet, SegResNet, UNet

from brainseg.config import Hyperparameters

SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4, 4, 4)
_NESTED_DECODER = re.compile(r"(^|\.)(model|submodule)\.2(\.|$)|(^|\.)(attention|upconv|merge)(\.|$)")
_ENCODER_PREFIXES = {
    "segresnet": ("convInit.", "down_layers."),
    "dynunet": ("input_block.", "downsamples.", "bottleneck."),
}


def check_patch_size(hp: Hyperparameters) -> None:
    """Every level halves the patch; refuse a patch size that does not divide."""
    factor = 2 ** (len(hp.channels) - 1)
    if any(size % factor for size in hp.patch_size):
        raise ValueError(f"patch_size {hp.patch_size}: with {len(hp.channels)} levels (channels {hp.channels}) "
                         f"every size must be a multiple of {factor}; change patch_size or channels")


def build_model(hp: Hyperparameters, out_channels: int) -> torch.nn.Module:
    """The network named by ``hp.model`` with ``hp.channels``, ``hp.activation``, ``hp.norm``,
    ``hp.dropout`` and ``out_channels`` outputs (the task's, :mod:`brainseg.tasks`).

    Raises:
        ValueError: the patch size does not divide by the network's downsampling, or (SegResNet)
            the channels do not double per level.
    """
    check_patch_size(hp)
    channels = tuple(hp.channels)
    strides = (2,) * (len(channels) - 1)
    act = hp.activation.upper()
    if hp.model == "unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=channels, strides=strides,
                    num_res_units=hp.res_units, act=act, norm=hp.norm.upper(), dropout=hp.dropout)
    if hp.model == "attention_unet":
        return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=channels,
                             strides=strides, dropout=hp.dropout)
    if hp.model == "segresnet":
        doubling = tuple(channels[0] * 2 ** level for level in range(len(channels)))
        if channels != doubling or len(channels) > len(SEGRESNET_BLOCKS_DOWN):
            raise ValueError(f"channels {channels}: segresnet widths double per level (e.g. {doubling}) "
                             f"with at most {len(SEGRESNET_BLOCKS_DOWN)} levels")
        return SegResNet(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=channels[0],
                         blocks_down=SEGRESNET_BLOCKS_DOWN[:len(channels)], blocks_up=(1,) * (len(channels) - 1),
                         dropout_prob=hp.dropout or None, act=act,
                         norm="INSTANCE" if hp.norm == "instance" else "BATCH")
    if hp.model == "dynunet":
        return DynUNet(spatial_dims=3, in_channels=1, out_channels=out_channels,
                       kernel_size=[3] * len(channels), strides=[1, *strides], upsample_kernel_size=list(strides),
                       filters=list(channels), dropout=hp.dropout or None, norm_name=hp.norm.upper(),
                       act_name=act, res_block=hp.res_units > 0)
    raise ValueError(f"model {hp.model!r}: expected one of unet, attention_unet, segresnet, dynunet")


def is_encoder_parameter(model_name: str, parameter: str) -> bool:
    """Whether ``parameter`` (a ``named_parameters`` name) belongs to the network's encoder path.

    MONAI's (Attention) U-Net nests each level as ``Sequential(down, skip, up)``; the encoder is
    every ``down`` and the bottom, i.e. everything not under an ``up`` branch (index 2 of a level,
    or an attention gate, up-convolution or merge).
    """
    if model_name in _ENCODER_PREFIXES:
        return parameter.startswith(_ENCODER_PREFIXES[model_name])
    return _NESTED_DECODER.search(parameter) is None


def freeze_encoder(model: torch.nn.Module, model_name: str) -> tuple[int, int]:
    """Stop gradients to the encoder; returns ``(frozen, trainable)`` parameter tensor counts."""
    frozen = trainable = 0
    for name, parameter in model.named_parameters():
        if is_encoder_parameter(model_name, name):
            parameter.requires_grad_(False)
            frozen += 1
        else:
            trainable += 1
    return frozen, trainable


def encoder_state(model: torch.nn.Module, model_name: str) -> dict:
    """The encoder's parameters and buffers, as another run's ``--init-weights`` loads them."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_encoder_parameter(model_name, name)}


def load_matching(model: torch.nn.Module, state: dict) -> dict:
    """Copy the tensors of ``state`` whose name and shape match the model's.

    Returns:
        ``{"loaded": [...], "shape_mismatch": [...], "unexpected": [...], "missing": [...]}``
        (names), so the caller can report what did not match.
    """
    own = model.state_dict()
    report = {"loaded": [], "shape_mismatch": [], "unexpected": [], "missing": []}
    matching = {}
    for name, tensor in state.items():
        if name not in own:
            report["unexpected"].append(name)
        elif tuple(own[name].shape) != tuple(tensor.shape):
            report["shape_mismatch"].append(f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
        else:
            matching[name] = tensor
            report["loaded"].append(name)
    report["missing"] = [name for name in own if name not in matching]
    own.update(matching)
    model.load_state_dict(own)
    return report
