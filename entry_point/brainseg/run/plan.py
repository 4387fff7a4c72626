"""A training plan from the dataset's fingerprint and the GPU's memory (``--plan auto``), after
nnU-Net's rules, for the flags the user did not give.

- Target spacing: the median spacing; when the data is anisotropic (the coarsest median spacing
  over three times the finest), the coarse axis takes the 10th percentile of its spacings instead
  (but never finer than the other axes), so thin-slice cases are not thrown away to thick ones.
- Patch size: the median shape at the target spacing (at most 256 per axis), shrunk along the axis
  where it is largest in millimetres until the network fits the memory, every size a multiple of
  the network's total stride.
- Network: a level per halving while the bottleneck keeps at least 4 voxels per axis (at most 6
  levels), 32 feature channels at the top doubling per level up to 320.
- Batch size: 2, more while the memory allows and a batch stays within 5% of the dataset's voxels.
- The patch pipeline's host memory budget: two slabs per DataLoader worker (never lowered).

Memory is estimated, not measured: the network's activations are counted on PyTorch's meta device
(no memory, no compute) and priced at 5.5 bytes per activation in fp32 (3.3 with bf16/fp16
autocast), the peak-memory-per-activation measured for forward plus backward of these U-Nets on
the CPU, plus 16 bytes per parameter (weights, gradients, two Adam moments) and 1 GiB for the CUDA
context and cuDNN workspaces. Against a training step's measured peak on the CPU
(``benchmarks/plan_memory.py``) it is 0.94 to 1.44 times the step's; it has not been checked
against a GPU's peak memory (``benchmarks/gpu.py`` prints both where a GPU is).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch

from brainseg.config import Hyperparameters
from brainseg.data.fingerprint import Fingerprint
from brainseg.layout import RunLayout
from brainseg.model.networks import NetworkSpec, build_model
from brainseg.stream_config import MiB

logger = logging.getLogger("brainseg.train")

PLANNED = ("target_spacing", "patch_size", "batch_size", "channels", "memory_budget_mb")  # the fields a plan sets
SLABS_PER_WORKER = 2  # the pipeline's budget holds this many slabs per DataLoader worker (one read ahead)
ANISOTROPY = 3.0
MAX_PATCH = 256
MIN_BOTTLENECK = 4
MAX_LEVELS = 6
BASE_WIDTH, MAX_WIDTH = 32, 320
BATCH_SHARE = 0.05  # a batch holds at most this share of the dataset's voxels (nnU-Net)
BYTES_PER_ACTIVATION = {"fp32": 5.5, "bf16": 3.3, "fp16": 3.3}
CONTEXT_GB = 1.0
CPU_MEMORY_GB = 8.0  # what a plan assumes without a GPU and without --gpu-memory-gb


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains with, why, and the fingerprint it came from."""

    target_spacing: tuple
    patch_size: tuple
    batch_size: int
    channels: tuple
    memory_budget_mb: int
    memory_gb: float
    estimated_gb: float
    notes: tuple
    fingerprint: dict

    def values(self) -> dict:
        """The plan as train.py's fields."""
        return {"target_spacing": ",".join(f"{v:g}" for v in self.target_spacing), "patch_size": self.patch_size,
                "batch_size": self.batch_size, "channels": self.channels, "memory_budget_mb": self.memory_budget_mb}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"target spacing {'x'.join(f'{v:g}' for v in self.target_spacing)} mm, patch "
                f"{'x'.join(map(str, self.patch_size))}, batch {self.batch_size}, channels "
                f"{','.join(map(str, self.channels))} ({len(self.channels)} levels), about {self.estimated_gb:.1f} "
                f"of {self.memory_gb:g} GB")


def target_spacing(fingerprint: Fingerprint) -> tuple[tuple, str]:
    """The target spacing and why (nnU-Net's anisotropy rule)."""
    spacing = list(fingerprint.median_spacing)
    coarse = max(range(3), key=lambda axis: spacing[axis])
    finest_other = max(spacing[axis] for axis in range(3) if axis != coarse)
    if spacing[coarse] > ANISOTROPY * min(spacing):
        spacing[coarse] = max(fingerprint.spacing_p10[coarse], finest_other)
        return tuple(spacing), (f"anisotropic data (median {fingerprint.median_spacing}): axis {coarse} at the 10th "
                                f"percentile of its spacings, {spacing[coarse]:g} mm")
    return tuple(spacing), "the median spacing"


def network_channels(patch: tuple) -> tuple:
    """A level per halving of the smallest patch side down to :data:`MIN_BOTTLENECK`."""
    levels = max(2, min(MAX_LEVELS, 1 + int(math.log2(max(min(patch), 1) / MIN_BOTTLENECK))))
    return tuple(min(BASE_WIDTH * 2 ** level, MAX_WIDTH) for level in range(levels))


@functools.lru_cache(maxsize=64)
def activations_per_voxel(spec: NetworkSpec) -> float:
    """Activation values per input voxel and patch of ``spec``, counted on the meta device at the
    smallest patch its strides allow (activations grow linearly with the patch's voxels)."""
    side = 2 ** (len(spec.channels) - 1) * 2
    counted = [0]

    def count(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            counted[0] += output.numel()

    with torch.device("meta"):
        network = build_model(spec)
        for module in network.modules():
            if not list(module.children()):
                module.register_forward_hook(count)
        network(torch.empty(1, spec.in_channels, side, side, side))
    return counted[0] / side ** 3


def estimate_gb(spec: NetworkSpec, patch: tuple, batch: int, precision: str) -> float:
    """The training step's peak GPU memory in GB, estimated (see the module's notes)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(spec).parameters())
    activations = activations_per_voxel(spec) * math.prod(patch) * batch
    return (activations * BYTES_PER_ACTIVATION[precision] + 16 * parameters) / 1e9 + CONTEXT_GB


def _fitted(shape: tuple, spacing: tuple, spec: NetworkSpec, memory_gb: float, precision: str,
            channels: tuple | None) -> tuple[tuple, tuple, float]:
    """The largest patch (and its channels and estimate) that fits ``memory_gb`` at batch 2;
    ``channels`` fixed when given, else :func:`network_channels` of each candidate patch."""
    patch = [min(int(size), MAX_PATCH) for size in shape]
    while True:
        widths = channels or network_channels(patch)
        stride = 2 ** (len(widths) - 1)
        sizes = tuple(max(stride, size // stride * stride) for size in patch)
        estimate = estimate_gb(dataclasses.replace(spec, channels=widths), sizes, 2, precision)
        if estimate <= memory_gb or max(patch) <= stride:
            return sizes, widths, estimate
        axis = max(range(3), key=lambda a: (patch[a] * spacing[a], patch[a]))  # the longest side in mm
        patch[axis] = max(stride, patch[axis] - max(stride // 2, 1))


def make_plan(fingerprint: Fingerprint, hp: Hyperparameters, out_channels: int, memory_gb: float,
              given: frozenset = frozenset()) -> Plan:
    """The plan for ``hp``'s network type and precision on data of ``fingerprint``; the fields in
    ``given`` keep ``hp``'s values and the others are planned around them."""
    spacing, why_spacing = target_spacing(fingerprint)
    if "target_spacing" in given and isinstance(hp.target_spacing_mm, tuple):
        spacing, why_spacing = hp.target_spacing_mm, "as given"
    shape = tuple(size * native / target for size, native, target
                  in zip(fingerprint.median_shape, fingerprint.median_spacing, spacing))
    spec = NetworkSpec.of(hp, out_channels)
    fixed = tuple(hp.channels) if "channels" in given else None
    if "patch_size" in given:
        patch, channels = tuple(hp.patch_size), fixed or network_channels(hp.patch_size)
    else:
        patch, channels, _ = _fitted(shape, spacing, spec, memory_gb, hp.precision, fixed)
    spec = dataclasses.replace(spec, channels=channels)
    batch, dataset_voxels = 2, fingerprint.cases * math.prod(shape)
    while "batch_size" not in given and (batch + 1) * math.prod(patch) <= BATCH_SHARE * dataset_voxels \
            and estimate_gb(spec, patch, batch + 1, hp.precision) <= memory_gb:
        batch += 1
    batch = hp.batch_size if "batch_size" in given else batch
    budget = hp.memory_budget_mb if "memory_budget_mb" in given else max(hp.memory_budget_mb,
                                                                         pipeline_mb(hp, patch, shape))
    notes = (f"target spacing: {why_spacing}",
             f"patch: the median shape at that spacing ({'x'.join(f'{v:.0f}' for v in shape)}) fitted to "
             f"{memory_gb:g} GB", f"batch {batch}: {'the memory' if batch == 2 else 'memory and 5% of the voxels'}",
             f"memory budget {budget} MiB: {SLABS_PER_WORKER} slabs per DataLoader worker")
    return Plan(target_spacing=tuple(round(v, 4) for v in spacing), patch_size=patch, batch_size=batch,
                channels=channels, memory_budget_mb=budget, memory_gb=memory_gb,
                estimated_gb=round(estimate_gb(spec, patch, batch, hp.precision), 2), notes=notes,
                fingerprint=fingerprint.to_dict())


def pipeline_mb(hp: Hyperparameters, patch: tuple, shape: tuple) -> int:
    """MiB of host memory the patch pipeline needs for ``patch`` on volumes of ``shape`` (target
    grid): :data:`SLABS_PER_WORKER` slabs per worker, a slab as wide as the volume, 16-bit pixels."""
    config = dataclasses.replace(hp.stream_config(), patch_size=patch)
    slab = (patch[0] + hp.slab_margin[0], patch[1] + hp.slab_margin[1], max(patch[2], math.ceil(shape[2])))
    needed = config.slab_bytes(slab, 2, 2, len(hp.sequence_names)) * SLABS_PER_WORKER * max(1, hp.num_workers)
    return int(-(-needed // (256 * MiB)) * 256)


def device_memory_gb(hp: Hyperparameters, device: torch.device) -> float:
    """The memory a plan may fill: ``--gpu-memory-gb``, else the GPU's, else :data:`CPU_MEMORY_GB`."""
    if hp.gpu_memory_gb:
        return hp.gpu_memory_gb
    if device.type == "cuda":
        return round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return CPU_MEMORY_GB


def planned(hp: Hyperparameters, given: frozenset, plan: Plan) -> Hyperparameters:
    """``hp`` with the plan's values for every planned field not in ``given`` (the flags the user set)."""
    values = {name: value for name, value in plan.values().items() if name not in given}
    for name in sorted(set(PLANNED) & given):
        logger.info("plan: %s %s as given (the plan chose %s)", name, getattr(hp, name), plan.values()[name])
    return dataclasses.replace(hp, **values)


def plan_run(hp: Hyperparameters, given: frozenset, cases: list, out_channels: int, device: torch.device,
             store=None) -> Hyperparameters:
    """``hp`` completed by the plan of the training ``cases`` (logged, and written to the run's
    ``plan.json`` through ``store`` on the main rank)."""
    fingerprint = Fingerprint.of(cases, hp.sequence_names, hp.label_scheme.structures)
    plan = make_plan(fingerprint, hp, out_channels, device_memory_gb(hp, device), given)
    logger.info("plan: %s", plan.describe())
    for note in plan.notes:
        logger.info("plan: %s", note)
    if store is not None:
        store.put_json(RunLayout.PLAN, plan.to_dict())
    return planned(hp, given, plan)
