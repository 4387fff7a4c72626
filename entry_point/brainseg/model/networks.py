"""One factory for the MONAI 3D networks a run can train, and which of their layers form the encoder.

Every network maps ``(N, S, D, H, W)`` images (one channel per sequence) to ``(N, C, D, H, W)``
outputs, ``C`` set by the task: background plus one channel per class (softmax), one channel per
region (sigmoid, e.g. WT/TC/ET), or one per sequence (the autoencoder's reconstruction).
Each level of ``channels`` halves the resolution, so patch sizes must divide by ``2**(levels-1)``
(:func:`brainseg.config.check_patch_size`, which every Hyperparameters applies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from monai.networks.nets import AttentionUnet, DynUNet, SegResNet, UNet

from brainseg.config import Hyperparameters

SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4, 4, 4)
NETWORKS = {"UNet": UNet, "AttentionUnet": AttentionUnet, "SegResNet": SegResNet, "DynUNet": DynUNet}
_NESTED_DECODER = re.compile(r"(^|\.)(model|submodule)\.2(\.|$)|(^|\.)(attention|upconv|merge)(\.|$)")
_ENCODER_PREFIXES = {
    "segresnet": ("convInit.", "down_layers."),
    "dynunet": ("input_block.", "downsamples.", "bottleneck."),
}


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that defines a network's architecture: enough to build it again for its weights."""

    name: str = "unet"
    channels: tuple = (16, 32, 64, 128, 256)
    res_units: int = 2
    activation: str = "prelu"
    norm: str = "instance"
    dropout: float = 0.0
    in_channels: int = 1
    out_channels: int = 2
    deep_supervision: int = 0  # DynUNet: coarser output heads supervised in training (0: none)

    @classmethod
    def of(cls, hp: Hyperparameters, out_channels: int) -> NetworkSpec:
        """The network a run's hyperparameters describe (one input channel per sequence), with its
        task's ``out_channels``."""
        return cls(name=hp.model, channels=tuple(hp.channels), res_units=hp.res_units, activation=hp.activation,
                   norm=hp.norm, dropout=hp.dropout, in_channels=len(hp.sequence_names), out_channels=out_channels,
                   deep_supervision=deep_heads(len(hp.channels)) if hp.deep_supervision else 0)


def deep_heads(levels: int) -> int:
    """The coarser heads deep supervision adds: two, or fewer where the decoder is shallower."""
    return max(0, min(2, levels - 2))


def network_arguments(spec: NetworkSpec) -> tuple[str, dict]:
    """The MONAI class (``monai.networks.nets``) and keyword arguments of the network ``spec``
    describes, as plain values (a MONAI bundle's ``network_def`` holds them).

    Raises:
        ValueError: an unknown network, or (SegResNet) channels that do not double per level.
    """
    channels = list(spec.channels)
    strides = [2] * (len(channels) - 1)
    act = spec.activation.upper()
    sizes = {"spatial_dims": 3, "in_channels": spec.in_channels, "out_channels": spec.out_channels}
    if spec.name == "unet":
        return "UNet", dict(**sizes, channels=channels, strides=strides, num_res_units=spec.res_units, act=act,
                            norm=spec.norm.upper(), dropout=spec.dropout)
    if spec.name == "attention_unet":
        return "AttentionUnet", dict(**sizes, channels=channels, strides=strides, dropout=spec.dropout)
    if spec.name == "segresnet":
        doubling = [channels[0] * 2 ** level for level in range(len(channels))]
        if channels != doubling or len(channels) > len(SEGRESNET_BLOCKS_DOWN):
            raise ValueError(f"channels {tuple(channels)}: segresnet widths double per level (e.g. {tuple(doubling)}) "
                             f"with at most {len(SEGRESNET_BLOCKS_DOWN)} levels")
        return "SegResNet", dict(**sizes, init_filters=channels[0], blocks_down=list(SEGRESNET_BLOCKS_DOWN[:len(channels)]),
                                 blocks_up=[1] * (len(channels) - 1), dropout_prob=spec.dropout or None, act=act,
                                 norm="INSTANCE" if spec.norm == "instance" else "BATCH")
    if spec.name == "dynunet":
        return "DynUNet", dict(**sizes, kernel_size=[3] * len(channels), strides=[1, *strides],
                               upsample_kernel_size=strides, filters=channels, dropout=spec.dropout or None,
                               norm_name=spec.norm.upper(), act_name=act, res_block=spec.res_units > 0,
                               deep_supervision=spec.deep_supervision > 0, deep_supr_num=max(spec.deep_supervision, 1))
    raise ValueError(f"model {spec.name!r}: expected one of unet, attention_unet, segresnet, dynunet")


def build_model(spec: NetworkSpec) -> torch.nn.Module:
    """The MONAI network ``spec`` describes.

    Raises:
        ValueError: as :func:`network_arguments`.
    """
    name, arguments = network_arguments(spec)
    return NETWORKS[name](**arguments)


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
