"""How the patch stream samples, fetches, normalises and augments (:class:`StreamConfig`), and
the one place its memory budget is divided among DataLoader workers (:func:`check_budget`).

Free of torch, as :mod:`brainseg.config`, which builds a :class:`StreamConfig` from train.py's flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NORMALIZATIONS = ("zscore", "minmax")
FOREGROUND_SAMPLINGS = ("labels", "voxels", "lesions")
MiB = 1024 * 1024
FLOAT_BYTES = 4


def flag_field(default, help_text: str):
    """A dataclass field with its ``--help`` text (train.py's flag builder reads it)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class StreamConfig:
    """How patches are sampled, fetched, normalised and augmented; each field's help text says what
    it does (train.py's flags of the same names take their defaults and help from here). A patch
    depends only on ``seed`` and its slab number; ``memory_budget_bytes`` bounds what every
    DataLoader worker of one process group holds together."""

    patch_size: tuple = flag_field((96, 96, 96), "(D, H, W) voxels of each patch; clamped to, and padded for, small "
                                             "volumes")
    foreground_fraction: float = flag_field(1.0 / 3.0, "share of patches centred on a tumour voxel (nnU-Net uses 1/3)")
    foreground_sampling: str = flag_field("labels", "where foreground patches are centred: labels (evenly over the label "
                                                "values present, a small class as often as a large one, as nnU-Net) "
                                                "voxels (uniformly over the tumour's voxels, as MONAI's "
                                                "RandCropByPosNegLabeld) or lesions (evenly over the lesions, "
                                                "then over each lesion's label values: a small lesion beside a "
                                                "large one as often as it)")
    patches_per_slab: int = flag_field(4, "patches cut from each fetched slab, to amortise its requests")
    slab_margin: tuple = flag_field((16, 16), "extra (D, H) voxels fetched around a patch, room for the slab's patches "
                                          "to differ (the full width is fetched: rows are contiguous in DICOM)")
    mix_slabs: int = flag_field(2, "consecutive slabs whose patches are interleaved, so a batch mixes cases")
    normalization: str = flag_field("zscore", "zscore (body mean and std) or minmax (0.5-99.5 percentile to [0, 1])")
    augment: bool = flag_field(True, "mirroring, rotation, scaling, elastic deformation, bias field, gamma, blur, lower "
                                 "resolution, intensity scale/shift, noise (brainseg.data.augment)")
    sequence_dropout: float = flag_field(0.0, "probability that a training patch has one sequence, drawn evenly, "
                                              "replaced by zeros (with --augment): the network learns to read "
                                              "each sequence without the others")
    sequence_dropout_channels: tuple = flag_field((), "the channels sequence dropout may drop (empty: any)")
    memory_budget_bytes: int = flag_field(1024 * MiB, "bytes the patch pipeline may hold, shared by the DataLoader workers")
    read_ahead: int = flag_field(4, "slabs fetched ahead of the consumer per worker (the budget may lower it)")
    seed: int = flag_field(0, "seed of every random choice")

    def slab_bytes(self, slab: tuple, image_bytes: int, mask_bytes: int, channels: int = 1) -> int:
        """Upper bound of the memory one slab read holds: a ``slab`` ``(D, H, W)`` of each of ``channels``
        sequences and of the mask, raw and decoded, plus the patches cut from it."""
        slab_voxels = slab[0] * slab[1] * slab[2]
        patch_voxels = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        return (slab_voxels * (channels * (FLOAT_BYTES + image_bytes) + FLOAT_BYTES + mask_bytes)
                + self.patches_per_slab * patch_voxels * (channels * FLOAT_BYTES + 1))

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        object.__setattr__(self, "slab_margin", tuple(int(v) for v in self.slab_margin))
        object.__setattr__(self, "sequence_dropout_channels", tuple(int(v) for v in self.sequence_dropout_channels))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {self.patch_size}: expected three positive sizes (D, H, W)")
        if len(self.slab_margin) != 2 or min(self.slab_margin) < 0:
            raise ValueError(f"slab_margin {self.slab_margin}: expected two non-negative sizes (D, H)")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction {self.foreground_fraction}: expected a value in [0, 1]")
        if not 0.0 <= self.sequence_dropout <= 1.0:
            raise ValueError(f"sequence_dropout {self.sequence_dropout}: expected a value in [0, 1]")
        if self.sequence_dropout_channels and min(self.sequence_dropout_channels) < 0:
            raise ValueError(f"sequence_dropout_channels {self.sequence_dropout_channels}: expected channel indices")
        if self.foreground_sampling not in FOREGROUND_SAMPLINGS:
            raise ValueError(f"foreground_sampling {self.foreground_sampling!r}: expected one of "
                             f"{', '.join(FOREGROUND_SAMPLINGS)}")
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


def check_budget(budget_bytes: int, workers: int, needed_bytes: int) -> int:
    """How many slabs of ``needed_bytes`` one of ``workers`` DataLoader workers may hold within its
    share of the memory budget: the one place the budget is divided and its refusal worded.

    Raises:
        ValueError: not even one slab fits, naming the flag to raise and by how much.
    """
    workers = max(1, workers)
    fits = budget_bytes // workers // max(1, needed_bytes)
    if fits < 1:
        least = -(-needed_bytes * workers // MiB)
        raise ValueError(f"--memory-budget-mb {budget_bytes / MiB:.0f} gives each of {workers} DataLoader worker(s) "
                         f"{budget_bytes / workers / MiB:.0f} MiB, but one slab needs {needed_bytes / MiB:.0f} MiB; "
                         f"raise --memory-budget-mb to at least {least}, or lower --patch-size, --slab-margin, "
                         "--patches-per-slab or --num-workers")
    return int(fits)
