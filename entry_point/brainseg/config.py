"""Configuration of the data pipeline: frozen, checked on construction, free of torch.

The launcher imports this module on a laptop without torch; keep it that way.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALIZATIONS = ("zscore", "minmax")
MiB = 1024 * 1024


@dataclass(frozen=True)
class StreamConfig:
    """How patches are sampled, fetched, normalised and augmented.

    Attributes:
        patch_size: ``(D, H, W)`` voxels of each patch; clamped to, and padded for, small volumes.
        foreground_fraction: share of patches centred on a tumour voxel (nnU-Net uses 1/3).
        patches_per_slab: patches cut from each fetched slab, to amortise its requests.
        slab_margin: extra ``(D, H)`` voxels fetched around a patch, room for the slab's patches
            to differ (the full width is fetched anyway: rows are contiguous in DICOM).
        mix_slabs: patches of this many consecutive slabs are interleaved, so a batch mixes
            cases; the first batch waits for this many slabs (1: each slab's patches in a row).
        normalization: ``"zscore"`` (body mean and std) or ``"minmax"`` (0.5-99.5 percentile to [0, 1]).
        augment: random flips, in-plane 90-degree rotations, intensity scale/shift and noise.
        memory_budget_bytes: hard bound on slabs and patches held by the pipeline, shared by all
            DataLoader workers of one process group.
        read_ahead: slabs fetched ahead of the consumer per worker (the budget may lower it).
        seed: seed of every random choice; a patch depends only on the seed and its task index.
    """

    patch_size: tuple = (96, 96, 96)
    foreground_fraction: float = 1.0 / 3.0
    patches_per_slab: int = 4
    slab_margin: tuple = (16, 16)
    mix_slabs: int = 2
    normalization: str = "zscore"
    augment: bool = True
    memory_budget_bytes: int = 1024 * MiB
    read_ahead: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        object.__setattr__(self, "slab_margin", tuple(int(v) for v in self.slab_margin))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {self.patch_size}: expected three positive sizes (D, H, W)")
        if len(self.slab_margin) != 2 or min(self.slab_margin) < 0:
            raise ValueError(f"slab_margin {self.slab_margin}: expected two non-negative sizes (D, H)")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction {self.foreground_fraction}: expected a value in [0, 1]")
        if self.patches_per_slab < 1:
            raise ValueError(f"patches_per_slab {self.patches_per_slab}: expected at least 1")
        if self.mix_slabs < 1:
            raise ValueError(f"mix_slabs {self.mix_slabs}: expected at least 1")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {self.normalization!r}: expected one of {NORMALIZATIONS}")
        if self.read_ahead < 1:
            raise ValueError(f"read_ahead {self.read_ahead}: expected at least 1")
        if self.memory_budget_bytes < 16 * MiB:
            raise ValueError(f"memory_budget_bytes {self.memory_budget_bytes}: expected at least 16 MiB")
