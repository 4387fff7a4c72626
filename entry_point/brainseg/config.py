"""A run's configuration: the patch stream's settings (:class:`StreamConfig`) and every
hyperparameter of train.py (:class:`Hyperparameters`, each field a flag with its help text and
group), frozen and checked on construction; the flag builder train.py and predict.py share; the
checks across fields (patch size against the network's levels, the memory budget, locations).

Free of torch: the launcher imports this module on a laptop to check a job before submitting it.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
from dataclasses import dataclass, field, fields

from brainseg.labels import LabelScheme, parse_scheme

NORMALIZATIONS = ("zscore", "minmax")
MiB = 1024 * 1024
FLOAT_BYTES = 4
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Arguments SageMaker itself may add to the entry script's command line (the tuner's
# sagemaker_program/submit_directory, a training recipe's path, a tuning job's objective, the
# SDK v2 estimators' own); every other unknown argument is an error.
SAGEMAKER_ARGUMENTS = frozenset({
    "sagemaker_program", "sagemaker_submit_directory", "sagemaker_recipe_local_path", "_tuning_objective_metric",
    "sagemaker_container_log_level", "sagemaker_job_name", "sagemaker_region", "sagemaker_estimator_class_name",
    "sagemaker_estimator_module", "sagemaker_torch_distributed_enabled"})


def check_run_name(name: str, what: str = "run_name") -> None:
    """A run name becomes an S3 folder: letters, digits, '.', '_' or '-', at most 128.

    Raises:
        ValueError: the name says which field it came from and what is allowed.
    """
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r}: expected 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")


def _prefix(uri: str) -> str:
    return uri.rstrip("/") + "/"


def inside(uri: str, prefix: str) -> bool:
    """Whether the S3 location ``uri`` lies under (or is) the prefix ``prefix``."""
    return _prefix(uri).startswith(_prefix(prefix))


def _field(default, help_text: str):
    """A field with its ``--help`` text."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class StreamConfig:
    """How patches are sampled, fetched, normalised and augmented; each field's help text says what
    it does (train.py's flags of the same names take their defaults and help from here). A patch
    depends only on ``seed`` and its task index; ``memory_budget_bytes`` bounds what every
    DataLoader worker of one process group holds together."""

    patch_size: tuple = _field((96, 96, 96), "(D, H, W) voxels of each patch; clamped to, and padded for, small "
                                             "volumes")
    foreground_fraction: float = _field(1.0 / 3.0, "share of patches centred on a tumour voxel (nnU-Net uses 1/3)")
    patches_per_slab: int = _field(4, "patches cut from each fetched slab, to amortise its requests")
    slab_margin: tuple = _field((16, 16), "extra (D, H) voxels fetched around a patch, room for the slab's patches "
                                          "to differ (the full width is fetched: rows are contiguous in DICOM)")
    mix_slabs: int = _field(2, "consecutive slabs whose patches are interleaved, so a batch mixes cases")
    normalization: str = _field("zscore", "zscore (body mean and std) or minmax (0.5-99.5 percentile to [0, 1])")
    augment: bool = _field(True, "mirroring, rotation, scaling, elastic deformation, bias field, gamma, blur, lower "
                                 "resolution, intensity scale/shift, noise (brainseg.data.augment)")
    memory_budget_bytes: int = _field(1024 * MiB, "bytes the patch pipeline may hold, shared by the DataLoader workers")
    read_ahead: int = _field(4, "slabs fetched ahead of the consumer per worker (the budget may lower it)")
    seed: int = _field(0, "seed of every random choice")

    def task_bytes(self, slab: tuple, image_bytes: int, mask_bytes: int, channels: int = 1) -> int:
        """Upper bound of the memory one task holds: a ``slab`` ``(D, H, W)`` of each of ``channels``
        sequences and of the mask, raw and decoded, plus the patches cut from it."""
        slab_voxels = slab[0] * slab[1] * slab[2]
        patch_voxels = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        return (slab_voxels * (channels * (FLOAT_BYTES + image_bytes) + FLOAT_BYTES + mask_bytes)
                + self.patches_per_slab * patch_voxels * (channels * FLOAT_BYTES + 1))

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


def _stream_field(name: str):
    """A Hyperparameters field that is the StreamConfig field ``name``: its default and help text."""
    spec = next(spec for spec in fields(StreamConfig) if spec.name == name)
    return _field(spec.default, spec.metadata["help"])


# The StreamConfig fields train.py takes as they are (the budget is in MiB there, the seed seeds more).
STREAM_FLAGS = ("patch_size", "foreground_fraction", "patches_per_slab", "slab_margin", "mix_slabs", "normalization",
                "augment", "read_ahead")
TASKS = ("segmentation", "autoencoder", "lr_find")
MODELS = ("unet", "attention_unet", "segresnet", "dynunet")
ACTIVATIONS = ("relu", "prelu")
NORMS = ("instance", "batch")
LOSSES = ("dice_ce", "dice", "focal_tversky")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "onecycle", "poly", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_SOURCES = ("stream", "memory")
MISSING_SEQUENCES = ("exclude", "zero")
MLFLOW_URIS = ("arn:aws", "http://", "https://")
SEQUENCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

CHOICES = {"task": TASKS, "model": MODELS, "activation": ACTIVATIONS, "norm": NORMS, "loss": LOSSES,
           "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS, "data_source": DATA_SOURCES,
           "missing_sequences": MISSING_SEQUENCES}

# Fields that may change when a run resumes from its checkpoint; any other change is refused.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "log_every", "checkpoint_steps", "keep_checkpoints",
                               "num_workers", "init_weights", "max_val_cases", "sw_batch_size",
                               "trust_index", "refresh_index", "run_name", "output_uri", "compile",
                               "save_predictions", "allow_dataset_change", "mlflow_tracking_uri",
                               "mlflow_experiment"})


@dataclass(frozen=True)
class Hyperparameters:
    """Everything a training run is configured by; every field is a ``--flag`` of ``train.py``
    (``--help`` prints each field's help text, written beside it here).

    A run writes under ``<output_uri>/<run_name>/``; the stream fields (``patch_size`` ...
    ``seed``) are those of :class:`StreamConfig`.
    """

    # Data
    data_uri: str = _field("", "s3:// prefix holding one folder per case (required)")
    output_uri: str = _field("", "s3:// prefix the run is written under: <output_uri>/<run_name>/ (required)")
    run_name: str = _field("", "the run's folder; default the SageMaker job name, else a UTC timestamp. The same "
                               "name resumes a run")
    index_uri: str = _field("", "where the header index lives (default <data_uri>/.brainseg/index.jsonl; elsewhere "
                                "when the data bucket is read-only)")
    trust_index: bool = _field(False, "take the case list from the index without listing the data prefix")
    refresh_index: bool = _field(False, "read every header again, ignoring the saved index")
    allow_dataset_change: bool = _field(False, "resume even though the dataset changed since the checkpoint "
                                               "(a warning instead of a refusal)")
    max_train_cases: int = _field(0, "keep the first N training cases, the low-label regime (0: all)")
    max_val_cases: int = _field(0, "validate on the first N validation cases, to bound its cost (0: all)")
    data_source: str = _field("stream", "stream: patches by ranged GETs; memory: download each training volume "
                                        "first (the reference)")
    max_header_mb: int = _field(1, "refuse an object whose header does not end within this many MiB")
    sequences: str = _field("image", "the sequence folders of a case, in channel order, e.g. t1c,t1,t2,flair "
                                     "(<case>/<sequence>/*.dcm); image: the single image/ folder")
    missing_sequences: str = _field("exclude", "a case lacking a sequence: exclude it, or zero-fill the channel "
                                               "(the case is noted)")
    labels: str = _field("tumour=*", "classes by the mask's label values, e.g. ncr=1,ed=2,et=4 (1+3 or 1-3 for "
                                     "several values; * any non-zero value)")
    regions: str = _field("", "overlapping regions over the classes, each a sigmoid channel, e.g. "
                              "wt=ncr+ed+et,tc=ncr+et,et=et or brats (empty: softmax over the classes)")
    target_spacing: str = _field("median", "the grid the network sees, dz,dy,dx in mm: median (the training cases' "
                                           "median spacing), native (no resampling) or three numbers")
    # Model
    task: str = _field("segmentation", "segmentation; autoencoder: masked-image reconstruction pretraining on "
                                       "images without masks; lr_find: a learning-rate range test of the "
                                       "segmentation run these flags describe (lr_find.json, no model)")
    model: str = _field("unet", "the MONAI network: U-Net (residual units), Attention U-Net, SegResNet or DynUNet")
    channels: tuple = _field((16, 32, 64, 128, 256), "feature channels per level; each level halves the resolution")
    res_units: int = _field(2, "residual units per level (U-Nets)")
    activation: str = _field("prelu", "activation function of the U-Nets")
    norm: str = _field("instance", "normalisation layers (instance norm suits batch 2)")
    dropout: float = _field(0.0, "dropout probability")
    # Optimisation
    loss: str = _field("dice_ce", "segmentation loss: Dice + cross-entropy, Dice, or Focal Tversky")
    optimizer: str = _field("adamw", "optimiser (SGD: Nesterov with --momentum)")
    lr: float = _field(1e-3, "peak learning rate (reached after the warm-up)")
    weight_decay: float = _field(1e-5, "weight decay (decoupled for AdamW)")
    momentum: float = _field(0.99, "SGD momentum (Nesterov)")
    schedule: str = _field("cosine", "learning-rate schedule after the warm-up")
    warmup_steps: int = _field(50, "linear warm-up steps")
    grad_clip: float = _field(12.0, "clip the gradient norm to this (0: off)")
    precision: str = _field("fp32", "bf16 or fp16 autocast (fp16 with a gradient scaler, GPU only)")
    compile: bool = _field(False, "torch.compile the network")
    lr_find_steps: int = _field(100, "lr_find: optimiser steps of the sweep (it stops early once the loss diverges)")
    lr_find_min: float = _field(1e-7, "lr_find: the first learning rate")
    lr_find_max: float = _field(1.0, "lr_find: the last learning rate (the sweep is exponential)")
    epochs: int = _field(50, "epochs of steps_per_epoch optimiser steps")
    steps_per_epoch: int = _field(250, "optimiser steps per epoch (patch sampling has no natural epoch)")
    batch_size: int = _field(2, "patches per step and rank")
    patience: int = _field(10, "validations without improvement before stopping early (0: never)")
    deterministic: bool = _field(False, "deterministic algorithms (bit-identical resume on CPU)")
    num_workers: int = _field(2, "DataLoader worker processes per rank (they share the memory budget)")
    # Evaluation
    sw_overlap: float = _field(0.25, "sliding-window overlap of whole-volume inference")
    sw_batch_size: int = _field(2, "windows per forward pass in whole-volume inference")
    save_predictions: bool = _field(True, "write each test case's image/mask/prediction crop to the output "
                                          "(patient pixels: turn off where the output bucket must hold none)")
    # Artifacts
    checkpoint_steps: int = _field(0, "also checkpoint every N steps within an epoch (0: at epoch ends only)")
    keep_checkpoints: int = _field(3, "newest checkpoints kept")
    log_every: int = _field(50, "a progress line every N steps when the output is not a terminal")
    # Experiment tracking (S3 holds everything either way)
    mlflow_tracking_uri: str = _field("", "also log parameters, epochs and the summary to MLflow: a SageMaker MLflow "
                                          "tracking server ARN or an http(s) URL (empty: off)")
    mlflow_experiment: str = _field("brainseg", "the MLflow experiment of the run")
    # Transfer
    init_weights: str = _field("", "s3:// URI or path of weights to start from (matching layers are loaded)")
    freeze_encoder: bool = _field(False, "train only the decoder")
    # The patch stream (StreamConfig)
    patch_size: tuple = _stream_field("patch_size")
    foreground_fraction: float = _stream_field("foreground_fraction")
    patches_per_slab: int = _stream_field("patches_per_slab")
    slab_margin: tuple = _stream_field("slab_margin")
    mix_slabs: int = _stream_field("mix_slabs")
    normalization: str = _stream_field("normalization")
    augment: bool = _stream_field("augment")
    memory_budget_mb: int = _field(StreamConfig.memory_budget_bytes // MiB, "MiB the patch pipeline may hold, shared "
                                                                            "by the DataLoader workers")
    read_ahead: int = _stream_field("read_ahead")
    seed: int = _field(StreamConfig.seed, "seeds the split, the initial weights, dropout and every patch")

    def __post_init__(self) -> None:
        for name in ("channels", "patch_size", "slab_margin"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        for name in ("data_uri", "output_uri"):
            value = getattr(self, name)
            if value and not value.startswith("s3://"):
                raise ValueError(f"{name} {value!r}: expected an s3:// URI")
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels {self.channels}: expected at least two positive widths, e.g. 16,32,64")
        check_patch_size(self.patch_size, self.channels)
        positive = ("epochs", "steps_per_epoch", "batch_size", "sw_batch_size", "log_every", "keep_checkpoints",
                    "max_header_mb")
        if self.mlflow_tracking_uri and not self.mlflow_tracking_uri.startswith(MLFLOW_URIS):
            raise ValueError(f"mlflow_tracking_uri {self.mlflow_tracking_uri!r}: expected a SageMaker MLflow tracking "
                             "server ARN (arn:aws:sagemaker:…:mlflow-tracking-server/…) or an http(s):// URL")
        if not self.mlflow_experiment.strip():
            raise ValueError("mlflow_experiment: expected a name")
        if self.lr_find_steps < 10:
            raise ValueError(f"lr_find_steps {self.lr_find_steps}: expected at least 10 (a curve to read a slope from)")
        if not 0 < self.lr_find_min < self.lr_find_max:
            raise ValueError(f"lr_find_min {self.lr_find_min} and lr_find_max {self.lr_find_max}: expected "
                             "0 < min < max")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: expected at least 1")
        non_negative = ("max_train_cases", "max_val_cases", "res_units", "warmup_steps", "grad_clip",
                        "patience", "num_workers", "checkpoint_steps", "lr", "weight_decay", "momentum")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)}: expected >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout}: expected a value in [0, 1)")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap {self.sw_overlap}: expected a value in [0, 1)")
        if self.run_name:
            check_run_name(self.run_name)
        self._check_sequences()
        _ = self.label_scheme  # parsed (and checked) once, here
        parse_target_spacing(self.target_spacing)
        self._check_locations()
        self._check_memory_budget()

    @functools.cached_property
    def label_scheme(self) -> LabelScheme:
        """The run's classes and regions (``--labels``, ``--regions``), parsed once per run."""
        return parse_scheme(self.labels, self.regions)

    @property
    def sequence_names(self) -> tuple[str, ...]:
        """The sequence folders in channel order."""
        return tuple(name.strip() for name in self.sequences.split(","))

    @property
    def target_spacing_mm(self) -> tuple | str:
        """``"median"``, ``"native"`` or ``(dz, dy, dx)`` in mm."""
        return parse_target_spacing(self.target_spacing)

    def _check_sequences(self) -> None:
        names = self.sequence_names
        for name in names:
            if not SEQUENCE_NAME.fullmatch(name) or name == "mask":
                raise ValueError(f"sequences {self.sequences!r}: {name!r} is not a sequence folder name (lower-case "
                                 "letters, digits, '_' or '-'; not 'mask')")
        if len(set(names)) != len(names):
            raise ValueError(f"sequences {self.sequences!r}: a sequence is named twice")

    def _check_locations(self) -> None:
        """Outputs never inside the dataset: they would be listed as cases, and could overwrite data."""
        if self.data_uri and self.output_uri and inside(self.output_uri, self.data_uri):
            raise ValueError(f"output_uri {self.output_uri} is inside data_uri {self.data_uri}: runs would be read "
                             "as cases and could overwrite data; write the runs elsewhere")
        if self.data_uri and self.index_uri and inside(self.index_uri, self.data_uri) \
                and not inside(self.index_uri, _prefix(self.data_uri) + ".brainseg/"):
            raise ValueError(f"index_uri {self.index_uri} is inside data_uri {self.data_uri} but not under its "
                             ".brainseg/ folder; an index may live only there inside the dataset")

    def _check_memory_budget(self) -> None:
        """The smallest slab a patch needs (the volume at least as large as the patch) must fit in
        one DataLoader worker's share of the budget; the exact check needs the volumes' shapes."""
        config = self.stream_config()  # the stream settings check themselves
        slab = (self.patch_size[0] + self.slab_margin[0], self.patch_size[1] + self.slab_margin[1], self.patch_size[2])
        check_budget(config.memory_budget_bytes, self.num_workers, config.task_bytes(slab, 1, 1, len(self.sequence_names)))

    def run_uri(self, run_name: str) -> str:
        """``<output_uri>/<run_name>/``."""
        return f"{self.output_uri.rstrip('/')}/{run_name}/"

    def stream_config(self) -> StreamConfig:
        """The patch-stream settings of this run."""
        return StreamConfig(**{name: getattr(self, name) for name in STREAM_FLAGS},
                            memory_budget_bytes=self.memory_budget_mb * MiB, seed=self.seed)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) for v in [getattr(self, f.name)]}


def parse_target_spacing(text: str) -> tuple | str:
    """``--target-spacing``: ``"median"``, ``"native"`` or ``(dz, dy, dx)`` in mm.

    Raises:
        ValueError: anything else.
    """
    lowered = str(text).strip().lower()
    if lowered in ("median", "native"):
        return lowered
    try:
        values = tuple(float(v) for v in lowered.strip("[]").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"target_spacing {text!r}: expected median, native or three positive spacings in mm like "
                         "1,1,1")
    return values


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


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def _parse_ints(text: str) -> tuple:
    text = str(text).strip()
    try:
        values = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        return tuple(int(v) for v in values)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers as 1,2,3 or [1, 2, 3]") from None


def _converter(default):
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, tuple):
        return _parse_ints
    return type(default)


def field_converters() -> dict:
    """``{field name: function from its text form to its value}``."""
    return {f.name: _converter(f.default) for f in fields(Hyperparameters)}


# train.py --help shows the flags in these groups, in this order (a test checks every field is in one).
FLAG_GROUPS = {
    "data": ("data_uri", "output_uri", "run_name", "max_train_cases", "max_val_cases", "target_spacing"),
    "sequences and labels": ("sequences", "missing_sequences", "labels", "regions"),
    "model": ("task", "model", "channels", "res_units", "activation", "norm", "dropout", "init_weights",
              "freeze_encoder"),
    "optimisation": ("loss", "optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_steps", "grad_clip",
                     "epochs", "steps_per_epoch", "batch_size", "patience", "precision", "compile", "lr_find_steps",
                     "lr_find_min", "lr_find_max"),
    "patches": ("patch_size", "foreground_fraction", "normalization", "augment", "num_workers"),
    "evaluation": ("sw_overlap", "sw_batch_size", "save_predictions"),
    "checkpoints and tracking": ("checkpoint_steps", "keep_checkpoints", "log_every", "mlflow_tracking_uri",
                                 "mlflow_experiment"),
    "advanced": ("seed", "deterministic", "memory_budget_mb", "patches_per_slab", "slab_margin", "mix_slabs",
                 "read_ahead", "data_source", "index_uri", "trust_index", "refresh_index", "allow_dataset_change",
                 "max_header_mb"),
}
SAGEMAKER_HELP = ("On SageMaker the hyperparameters arrive as --snake_case flags (accepted as well as --kebab-case); "
                  "SM_MODEL_DIR, SM_OUTPUT_DATA_DIR, SM_HOSTS, SM_CURRENT_HOST and SM_NUM_GPUS are read from the "
                  "environment, with local fallbacks elsewhere. SageMaker's own arguments (sagemaker_program, ...) "
                  "are ignored.")
# Names other tools use for a flag (nnU-Net, MONAI, Lightning, Hugging Face), for a did-you-mean.
ECOSYSTEM_NAMES = {
    "learning_rate": "lr", "initial_lr": "lr", "max_lr": "lr", "num_epochs": "epochs", "max_epochs": "epochs",
    "n_epochs": "epochs", "train_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "batch": "batch_size", "wd": "weight_decay", "scheduler": "schedule", "lr_scheduler": "schedule",
    "lr_schedule": "schedule", "optim": "optimizer", "optimiser": "optimizer", "workers": "num_workers",
    "num_dataloader_workers": "num_workers", "roi_size": "patch_size", "spatial_size": "patch_size",
    "crop_size": "patch_size", "amp": "precision", "mixed_precision": "precision", "fp16": "precision",
    "bf16": "precision", "clip_grad_norm": "grad_clip", "gradient_clip_val": "grad_clip", "max_grad_norm": "grad_clip",
    "early_stopping_patience": "patience", "network": "model", "arch": "model", "architecture": "model",
    "modalities": "sequences", "features": "channels", "filters": "channels", "overlap": "sw_overlap",
    "pretrained": "init_weights", "pretrained_weights": "init_weights", "checkpoint_every": "checkpoint_steps",
    "iterations_per_epoch": "steps_per_epoch", "num_iterations_per_epoch": "steps_per_epoch",
    "warmup": "warmup_steps", "seed_everything": "seed", "dataset_uri": "data_uri", "train_uri": "data_uri",
    "output_path": "output_uri", "oversample_foreground_percent": "foreground_fraction",
}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, naming ``--help``, and exit 2. Flags
    added by :func:`add_flag` with ``required=True`` are required in either spelling."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.required_flags: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        missing = [name for name in self.required_flags if getattr(namespace, name) in ("", [], None)]
        if missing:
            self.error("the following arguments are required: " + ", ".join(
                f"--{name.replace('_', '-')}" for name in missing))
        return namespace, unknown

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")


def metavar(name: str, default) -> str:
    """How a flag's value is shown in ``--help``."""
    if isinstance(default, bool):
        return "true|false"
    if name in CHOICES:
        return "|".join(CHOICES[name])
    if isinstance(default, tuple):
        return ",".join(("D", "H", "W")[:len(default)]) if len(default) in (2, 3) and "size" in name else "N,N,..."
    if isinstance(default, int):
        return "N"
    if isinstance(default, float):
        return "X"
    return "URI" if name.endswith("_uri") else "TEXT"


def add_flag(parser: OneLineParser, name: str, help_text: str, required: bool = False, group=None,
             **options) -> None:
    """``--kebab-case`` shown in ``--help`` (under ``group`` when given), and ``--snake_case`` (as
    SageMaker passes it) accepted silently for the same field."""
    if required:
        parser.required_flags.append(name)
        help_text += "" if "(required)" in help_text else " (required)"
    target = group or parser
    target.add_argument(f"--{name.replace('_', '-')}", dest=name, help=help_text, **options)
    if "_" in name:
        target.add_argument(f"--{name}", dest=name, help=argparse.SUPPRESS,
                            **{key: value for key, value in options.items() if key != "metavar"})


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags, grouped as :data:`FLAG_GROUPS`."""
    parser = OneLineParser(
        prog="train.py", allow_abbrev=False, epilog=SAGEMAKER_HELP,
        usage="train.py --data-uri s3://BUCKET/DATASET/ --output-uri s3://BUCKET/RUNS/ [--FLAG VALUE ...]",
        description="Train a 3D U-Net on DICOM MRI streamed from S3 by byte ranges. Every flag is a field "
                    "of brainseg.config.Hyperparameters.")
    converters = field_converters()
    specs = {spec.name: spec for spec in fields(Hyperparameters)}
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            default = specs[name].default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default).lower() \
                if isinstance(default, bool) else default
            required = name in ("data_uri", "output_uri")
            add_flag(parser, name, specs[name].metadata["help"] + ("" if required or default == "" else
                                                                  f" (default: {shown})"),
                     required, group, type=converters[name], default=default, metavar=metavar(name, default))
    return parser


def check_patch_size(patch_size: tuple, channels: tuple) -> None:
    """Every level halves the patch; refuse a patch size that does not divide."""
    factor = 2 ** (len(channels) - 1)
    if any(size % factor for size in patch_size):
        raise ValueError(f"patch_size {tuple(patch_size)}: with {len(channels)} levels (channels {tuple(channels)}) "
                         f"every size must be a multiple of {factor}; change patch_size or channels")


def _did_you_mean(name: str, names=None) -> str:
    """``; did you mean --x?`` for the flag closest to ``name`` (or the one other tools call ``name``)."""
    names = names or [f.name for f in fields(Hyperparameters)]
    name = name.replace("-", "_")
    if ECOSYSTEM_NAMES.get(name) in names:
        return f"; did you mean --{ECOSYSTEM_NAMES[name].replace('_', '-')}?"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean --{close[0].replace('_', '-')}?" if close else ""


def sagemaker_arguments(unknown: list[str], script: str = "train.py", names=None) -> list[str]:
    """``unknown`` when it holds only SageMaker's own arguments (with their values); ``names`` are
    the script's flags (default the hyperparameters), to suggest the closest.

    Raises:
        ValueError: any other argument, named, with the closest flag when there is one.
    """
    position = 0
    while position < len(unknown):
        token = unknown[position]
        name, has_value, _ = token.removeprefix("--").partition("=")
        if not token.startswith("--") or name not in SAGEMAKER_ARGUMENTS:
            what = f"unknown flag {token.split('=')[0]}" if token.startswith("--") else f"unexpected argument {token!r}"
            raise ValueError(f"{what}{_did_you_mean(name, names) if token.startswith('--') else ''} ({script} --help "
                             "lists every flag)")
        position += 1 if has_value or position + 1 >= len(unknown) or unknown[position + 1].startswith("--") else 2
    return unknown


def parse_hyperparameters(argv: list[str]) -> tuple[Hyperparameters, list[str]]:
    """Hyperparameters from command-line arguments; returns them and the SageMaker arguments
    (:data:`SAGEMAKER_ARGUMENTS`) that were given and are ignored.

    Raises:
        SystemExit: a required flag is missing or a value cannot be parsed (argparse's message).
        ValueError: an unknown flag (with the closest known one), or a value out of range.
    """
    namespace, unknown = build_parser().parse_known_args(argv)
    ignored = sagemaker_arguments(unknown)
    return Hyperparameters(**vars(namespace)), ignored


def validate_overrides(overrides: dict) -> Hyperparameters:
    """Check ``{field: value or text}`` against the fields (for launchers); returns the result.

    Raises:
        ValueError: an unknown field, or a value that cannot be parsed or is out of range.
    """
    converters = field_converters()
    unknown = sorted(set(overrides) - set(converters))
    if unknown:
        raise ValueError(f"unknown hyperparameter {unknown[0]}{_did_you_mean(unknown[0])} (known: "
                         f"{', '.join(converters)})")
    values = {}
    for name, value in overrides.items():
        try:
            values[name] = converters[name](value) if isinstance(value, str) else value
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise ValueError(f"hyperparameter {name}={value!r}: {err}") from None
    return Hyperparameters(**values)
