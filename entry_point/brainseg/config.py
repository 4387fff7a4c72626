"""A run's configuration: every hyperparameter of train.py (:class:`Hyperparameters`, each field a
flag with its help text and group, the patch stream's taken from :class:`StreamConfig`), frozen
and checked on construction, with the checks across fields (patch size against the network's
levels, the memory budget, locations) and the target spacing's parser.

Free of torch: the launcher imports this module on a laptop to check a job before submitting it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, fields

from brainseg.labels import LabelScheme, parse_roi_labels, parse_scheme
from brainseg.locations import check_identity_key_uri, check_run_name, in_case_folders, inside
from brainseg.stream_config import MiB, StreamConfig, check_budget, flag_field

CASE_PER_HELP = ("the studies layout's case: a study (StudyInstanceUID), or a patient (PatientID: all of a patient's "
                 "studies one case, each sequence its latest series), for exports that split one exam over several "
                 "study UIDs; a patient's visits months apart show different tumours")
REGISTRATION_HELP = ("a sequence in another frame of reference than the study's reference sequence (another "
                     "session, a re-positioned patient): rigid registers it once, when the catalog is built "
                     "(SimpleITK, Mattes mutual information; kept in the header index); none excludes the study")


def _stream_field(name: str):
    """A Hyperparameters field that is the StreamConfig field ``name``: its default and help text."""
    spec = next(spec for spec in fields(StreamConfig) if spec.name == name)
    return flag_field(spec.default, spec.metadata["help"])


# The StreamConfig fields train.py takes as they are (the budget is in MiB there, the seed seeds more).
STREAM_FLAGS = ("patch_size", "foreground_fraction", "foreground_sampling", "patches_per_slab", "slab_margin", "mix_slabs", "normalization",
                "augment", "sequence_dropout", "read_ahead")
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
EMPTY_MASKS = ("keep", "exclude")
LAYOUTS = ("auto", "folders", "studies")  # brainseg.data.listing.LAYOUTS (this module imports no data code)
REGISTRATIONS = ("rigid", "none")  # brainseg.data.registration
CASES_PER = ("study", "patient")  # brainseg.data.studies.CASES_PER
RESAMPLINGS = ("separate_z", "linear")
KEEP_WEIGHTS = ("last", "best")
MLFLOW_URIS = ("arn:aws", "http://", "https://")
SEQUENCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

CHOICES = {"task": TASKS, "model": MODELS, "activation": ACTIVATIONS, "norm": NORMS, "loss": LOSSES,
           "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS, "data_source": DATA_SOURCES,
           "missing_sequences": MISSING_SEQUENCES, "empty_masks": EMPTY_MASKS, "plan": ("off", "auto"),
           "resampling": RESAMPLINGS, "layout": LAYOUTS, "registration": REGISTRATIONS, "keep_weights": KEEP_WEIGHTS, "case_per": CASES_PER}

# Fields that may change when a run resumes from its checkpoint; any other change is refused.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "log_every", "checkpoint_steps", "keep_checkpoints",
                               "num_workers", "init_weights", "max_val_cases", "sw_batch_size",
                               "trust_index", "refresh_index", "run_name", "output_uri", "compile",
                               "save_predictions", "sequence_importance", "allow_dataset_change", "mlflow_tracking_uri",
                               "mlflow_experiment", "cache_gb", "cache_dir", "get_price_per_1000",
                               "patches_per_s", "instance_usd_per_hour"})


@dataclass(frozen=True)
class Hyperparameters:
    """Everything a training run is configured by; every field is a ``--flag`` of ``train.py``
    (``--help`` prints each field's help text, written beside it here).

    A run writes under ``<output_uri>/<run_name>/``; the stream fields (``patch_size`` ...
    ``seed``) are those of :class:`StreamConfig`.
    """

    # Data
    data_uri: str = flag_field("", "s3:// prefix holding one folder per case (required)")
    output_uri: str = flag_field("", "s3:// prefix the run is written under: <output_uri>/<run_name>/ (required)")
    run_name: str = flag_field("", "the run's folder; default the SageMaker job name, else a UTC timestamp. The same "
                               "name resumes a run")
    index_uri: str = flag_field("", "where the header index lives (default <data_uri>/.brainseg/index.jsonl; elsewhere "
                                "when the data bucket is read-only)")
    identity_key_uri: str = flag_field("", "where the key of the index's identity hashes lives: s3://... (created there "
                                       "once; a location with its own grants) or env:NAME (hex in that variable); "
                                       "default beside the index")
    trust_index: bool = flag_field(False, "take the case list from the index without listing the data prefix")
    refresh_index: bool = flag_field(False, "read every header again, ignoring the saved index")
    allow_dataset_change: bool = flag_field(False, "resume even though the dataset changed since the checkpoint "
                                               "(a warning instead of a refusal)")
    max_train_cases: int = flag_field(0, "keep the first N training cases, the low-label regime (0: all)")
    max_val_cases: int = flag_field(0, "validate on the first N validation cases, to bound its cost (0: all)")
    folds: int = flag_field(5, "cross-validation folds of the training and validation cases (with --fold)")
    fold: int = flag_field(-1, "the fold (0-based) that validates while the others train, patient-level and seeded; "
                           "the test cases stay held out (-1: the train/val split as the catalog has it)")
    data_source: str = flag_field("stream", "stream: patches by ranged GETs; memory: download each training volume "
                                        "first (the reference)")
    max_header_mb: int = flag_field(1, "refuse an object whose header does not end within this many MiB")
    cache_gb: float = flag_field(20.0, "GB of fetched bytes kept on this host's disk (least recently used out, shared by "
                                   "the workers): from the second epoch a case costs no GETs; 0: off")
    cache_dir: str = flag_field("", "the cache's folder (default: $BRAINSEG_CACHE_DIR, else the instance's ML storage "
                                "volume on SageMaker, else a temporary folder)")
    get_price_per_1000: float = flag_field(0.0004, "USD per 1,000 GET requests, for the request-cost estimate "
                                               "(default: S3 Standard in us-east-1, list price)")
    patches_per_s: float = flag_field(0.0, "training patches per second the bill forecasts hours with (0: the rate "
                                           "table's for the instance type, brainseg.bill)")
    instance_usd_per_hour: float = flag_field(0.0, "USD per instance-hour the bill prices hours at (0: the price "
                                                   "table's for the instance type, brainseg.bill)")
    sequences: str = flag_field("image", "the sequence folders of a case, in channel order, e.g. t1c,t1,t2,flair "
                                     "(<case>/<sequence>/*.dcm); image: the single image/ folder")
    missing_sequences: str = flag_field("exclude", "a case lacking a sequence: exclude it, or zero-fill the channel "
                                               "(the case is noted)")
    empty_masks: str = flag_field("keep", "a case whose mask holds no tumour voxel: keep it as a tumour-free study "
                                          "(background patches in training, scored for detection) or exclude it")
    layout: str = flag_field("auto", "folders: <case>/<sequence>/*.dcm; studies: any tree of DICOM objects (a PACS "
                                 "export), a case per study, its series named by --sequence-rules; auto: folders "
                                 "when there are any")
    case_per: str = flag_field("study", CASE_PER_HELP)
    sequence_rules: str = flag_field("", "the studies layout's rules telling series apart (YAML, a path or s3:// URI; "
                                     "'extends: default' adds to the shipped ones; empty: the shipped brain MRI rules)")
    registration: str = flag_field("rigid", REGISTRATION_HELP)
    labels: str = flag_field("tumour=*", "classes by the mask's label values, e.g. ncr=1,ed=2,et=4 (1+3 or 1-3 for "
                                     "several values; * any non-zero value)")
    roi_labels: str = flag_field("", "RTSTRUCT masks: ROI names to label values, e.g. Edema=2,Necrosis=1,Enhancing=4 "
                                 "(painted in this order; names matched ignoring case; empty: every ROI as 1)")
    regions: str = flag_field("", "overlapping regions over the classes, each a sigmoid channel, e.g. "
                              "wt=ncr+ed+et,tc=ncr+et,et=et or brats (empty: softmax over the classes)")
    plan: str = flag_field("off", "auto: target spacing, patch size, batch size and channels from the dataset's "
                              "fingerprint and the GPU's memory, after nnU-Net (plan.json in the run; a flag given "
                              "wins); off: the flags' values")
    gpu_memory_gb: float = flag_field(0.0, "GB of GPU memory --plan auto may fill (0: the GPU's own; 8 without a GPU)")
    target_spacing: str = flag_field("median", "the grid the network sees, dz,dy,dx in mm: median (the training cases' "
                                           "median spacing), native (no resampling) or three numbers")
    resampling: str = flag_field("separate_z", "images onto the target grid: separate_z (nnU-Net's: where a case's or "
                                           "the target's spacing is anisotropic, coarsest > 3x finest, the coarse "
                                           "axis by nearest slice and the plane linearly), linear (every axis)")
    # Model
    task: str = flag_field("segmentation", "segmentation; autoencoder: masked-image reconstruction pretraining on "
                                       "images without masks; lr_find: a learning-rate range test of the "
                                       "segmentation run these flags describe (lr_find.json, no model)")
    model: str = flag_field("unet", "the MONAI network: U-Net (residual units), Attention U-Net, SegResNet or DynUNet")
    channels: tuple = flag_field((16, 32, 64, 128, 256), "feature channels per level; each level halves the resolution")
    res_units: int = flag_field(2, "residual units per level (U-Nets)")
    activation: str = flag_field("prelu", "activation function of the U-Nets")
    norm: str = flag_field("instance", "normalisation layers (instance norm suits batch 2)")
    dropout: float = flag_field(0.0, "dropout probability")
    deep_supervision: bool = flag_field(False, "dynunet: also train on the decoder's two coarser outputs (loss weights "
                                           "1, 1/2, 1/4), as nnU-Net does")
    # Optimisation
    loss: str = flag_field("dice_ce", "segmentation loss: Dice + cross-entropy, Dice, or Focal Tversky")
    optimizer: str = flag_field("adamw", "optimiser (SGD: Nesterov with --momentum)")
    lr: float = flag_field(1e-2, "peak learning rate (reached after the warm-up)")
    weight_decay: float = flag_field(1e-5, "weight decay (decoupled for AdamW)")
    momentum: float = flag_field(0.99, "SGD momentum (Nesterov)")
    schedule: str = flag_field("cosine", "learning-rate schedule after the warm-up")
    warmup_steps: int = flag_field(50, "linear warm-up steps")
    grad_clip: float = flag_field(12.0, "clip the gradient norm to this (0: off)")
    precision: str = flag_field("fp32", "bf16 or fp16 autocast (fp16 with a gradient scaler, GPU only)")
    compile: bool = flag_field(False, "torch.compile the network")
    lr_find_steps: int = flag_field(100, "lr_find: optimiser steps of the sweep (it stops early once the loss diverges)")
    lr_find_min: float = flag_field(1e-7, "lr_find: the first learning rate")
    lr_find_max: float = flag_field(1.0, "lr_find: the last learning rate (the sweep is exponential)")
    epochs: int = flag_field(50, "epochs of steps_per_epoch optimiser steps")
    steps_per_epoch: int = flag_field(250, "optimiser steps per epoch (patch sampling has no natural epoch)")
    batch_size: int = flag_field(2, "patches per step and rank")
    patience: int = flag_field(10, "validations without improvement before stopping early (0: never)")
    deterministic: bool = flag_field(False, "deterministic algorithms (bit-identical resume on CPU)")
    num_workers: int = flag_field(2, "DataLoader worker processes per rank (they share the memory budget)")
    # Evaluation
    keep_weights: str = flag_field("last", "the weights the model keeps: last (the end of the schedule, as nnU-Net's "
                                       "final checkpoint) or best (the best validation's)")
    sw_overlap: float = flag_field(0.25, "sliding-window overlap of whole-volume inference")
    sw_batch_size: int = flag_field(2, "windows per forward pass in whole-volume inference")
    save_predictions: bool = flag_field(True, "write each test case's image/mask/prediction crop to the output "
                                          "(patient pixels: turn off where the output bucket must hold none)")
    sequence_importance: int = flag_field(20, "test cases (the first by case ID) scored again with each sequence "
                                              "replaced by zeros, to say which sequence each structure rests on "
                                              "(a sequence's cost: one more inference of them; 0: off)")
    # Artifacts
    checkpoint_steps: int = flag_field(0, "also checkpoint every N steps within an epoch (0: at epoch ends only)")
    keep_checkpoints: int = flag_field(3, "newest checkpoints kept")
    log_every: int = flag_field(50, "a progress line every N steps when the output is not a terminal")
    # Experiment tracking (S3 holds everything either way)
    mlflow_tracking_uri: str = flag_field("", "also log parameters, epochs and the summary to MLflow: a SageMaker MLflow "
                                          "tracking server ARN or an http(s) URL (empty: off)")
    mlflow_experiment: str = flag_field("brainseg", "the MLflow experiment of the run")
    # Transfer
    init_weights: str = flag_field("", "s3:// URI or path of weights to start from (matching layers are loaded)")
    freeze_encoder: bool = flag_field(False, "train only the decoder")
    # The patch stream (StreamConfig)
    patch_size: tuple = _stream_field("patch_size")
    foreground_fraction: float = _stream_field("foreground_fraction")
    foreground_sampling: str = _stream_field("foreground_sampling")
    patches_per_slab: int = _stream_field("patches_per_slab")
    slab_margin: tuple = _stream_field("slab_margin")
    mix_slabs: int = _stream_field("mix_slabs")
    normalization: str = _stream_field("normalization")
    augment: bool = _stream_field("augment")
    sequence_dropout: float = _stream_field("sequence_dropout")
    sequence_dropout_among: str = flag_field("", "the sequences dropout may drop, comma-separated (empty: any); e.g. "
                                                 "t1,t2,flair keeps the T1c the enhancing tumour is defined on in "
                                                 "every patch")
    memory_budget_mb: int = flag_field(StreamConfig.memory_budget_bytes // MiB, "MiB the patch pipeline may hold, shared "
                                                                            "by the DataLoader workers")
    read_ahead: int = _stream_field("read_ahead")
    seed: int = flag_field(StreamConfig.seed, "seeds the split, the initial weights, dropout and every patch")

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
                        "patience", "num_workers", "checkpoint_steps", "sequence_importance", "lr", "weight_decay", "momentum", "cache_gb",
                        "gpu_memory_gb", "get_price_per_1000", "patches_per_s", "instance_usd_per_hour")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)}: expected >= 0")
        if self.folds < 2 or not -1 <= self.fold < self.folds:
            raise ValueError(f"fold {self.fold} of folds {self.folds}: expected at least 2 folds and a fold from 0 "
                             f"to {self.folds - 1} (or -1: no cross-validation)")
        if self.deep_supervision and (self.model != "dynunet" or len(self.channels) < 3 or self.task == "autoencoder"):
            raise ValueError(f"deep_supervision with task {self.task}, model {self.model} and {len(self.channels)} "
                             "levels: expected a segmentation with --model dynunet and at least 3 levels (channels)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout}: expected a value in [0, 1)")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap {self.sw_overlap}: expected a value in [0, 1)")
        if self.run_name:
            check_run_name(self.run_name)
        self._check_sequences()
        _ = self.label_scheme  # parsed (and checked) once, here
        parse_roi_labels(self.roi_labels)
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
    def sequence_dropout_names(self) -> tuple[str, ...]:
        """The sequences dropout may drop (``--sequence-dropout-among``; empty: any)."""
        return tuple(name.strip() for name in self.sequence_dropout_among.split(",") if name.strip())

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
        if self.sequence_dropout and (len(names) < 2 or not self.augment):
            raise ValueError(f"sequence_dropout {self.sequence_dropout} with sequences {self.sequences!r} and augment "
                             f"{self.augment}: expected at least two sequences and --augment true (it drops one of "
                             "them from a training patch)")
        among = self.sequence_dropout_names
        if any(name not in names for name in among) or len(set(among)) != len(among):
            raise ValueError(f"sequence_dropout_among {self.sequence_dropout_among!r}: expected distinct names among "
                             f"the sequences {self.sequences!r}")

    def _check_locations(self) -> None:
        """Outputs never inside the dataset: they would be listed as cases, and could overwrite data."""
        if self.data_uri and self.output_uri and inside(self.output_uri, self.data_uri):
            raise ValueError(f"output_uri {self.output_uri} is inside data_uri {self.data_uri}: runs would be read "
                             "as cases and could overwrite data; write the runs elsewhere")
        if self.index_uri and in_case_folders(self.index_uri, self.data_uri):
            raise ValueError(f"index_uri {self.index_uri} is inside data_uri {self.data_uri} but not under its "
                             ".brainseg/ folder; an index may live only there inside the dataset")
        check_identity_key_uri(self.identity_key_uri, self.data_uri)

    def _check_memory_budget(self) -> None:
        """The smallest slab a patch needs (the volume at least as large as the patch) must fit in
        one DataLoader worker's share of the budget; the exact check needs the volumes' shapes."""
        config = self.stream_config()  # the stream settings check themselves
        slab = (self.patch_size[0] + self.slab_margin[0], self.patch_size[1] + self.slab_margin[1], self.patch_size[2])
        check_budget(config.memory_budget_bytes, self.num_workers, config.slab_bytes(slab, 1, 1, len(self.sequence_names)))

    def run_uri(self, run_name: str) -> str:
        """``<output_uri>/<run_name>/``."""
        return f"{self.output_uri.rstrip('/')}/{run_name}/"

    def stream_config(self) -> StreamConfig:
        """The patch-stream settings of this run."""
        return StreamConfig(**{name: getattr(self, name) for name in STREAM_FLAGS},
                            sequence_dropout_channels=tuple(self.sequence_names.index(name)
                                                            for name in self.sequence_dropout_names),
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


def check_patch_size(patch_size: tuple, channels: tuple) -> None:
    """Every level halves the patch; refuse a patch size that does not divide."""
    factor = 2 ** (len(channels) - 1)
    if any(size % factor for size in patch_size):
        raise ValueError(f"patch_size {tuple(patch_size)}: with {len(channels)} levels (channels {tuple(channels)}) "
                         f"every size must be a multiple of {factor}; change patch_size or channels")
