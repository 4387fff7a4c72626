"""train.py's and predict.py's flags, generated from their dataclasses' fields: one builder
(:func:`add_flag`, :class:`OneLineParser`: kebab-case shown, snake_case accepted as SageMaker
passes it, one-line errors with a did-you-mean), train.py's groups and help, and the check of a
launcher's overrides (:func:`validate_overrides`). Free of torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import fields

from brainseg.config import CHOICES, Hyperparameters

# Arguments SageMaker itself may add to the entry script's command line (the tuner's
# sagemaker_program/submit_directory, a training recipe's path, a tuning job's objective, the
# SDK v2 estimators' own); every other unknown argument is an error.
SAGEMAKER_ARGUMENTS = frozenset({
    "sagemaker_program", "sagemaker_submit_directory", "sagemaker_recipe_local_path", "_tuning_objective_metric",
    "sagemaker_container_log_level", "sagemaker_job_name", "sagemaker_region", "sagemaker_estimator_class_name",
    "sagemaker_estimator_module", "sagemaker_torch_distributed_enabled"})


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
    "data": ("data_uri", "output_uri", "run_name", "max_train_cases", "max_val_cases", "folds", "fold", "plan",
             "gpu_memory_gb", "target_spacing", "resampling", "cache_gb", "cache_dir"),
    "sequences and labels": ("sequences", "missing_sequences", "empty_masks", "layout", "case_per", "sequence_rules",
                             "registration", "labels", "roi_labels", "regions"),
    "model": ("task", "model", "channels", "res_units", "activation", "norm", "dropout", "deep_supervision",
              "init_weights", "freeze_encoder"),
    "optimisation": ("loss", "optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_steps", "grad_clip",
                     "epochs", "steps_per_epoch", "batch_size", "patience", "precision", "compile", "lr_find_steps",
                     "lr_find_min", "lr_find_max"),
    "patches": ("patch_size", "foreground_fraction", "foreground_sampling", "normalization", "augment", "sequence_dropout",
                "sequence_dropout_among", "num_workers"),
    "evaluation": ("keep_weights", "sw_overlap", "sw_batch_size", "save_predictions", "sequence_importance"),
    "checkpoints and tracking": ("checkpoint_steps", "keep_checkpoints", "log_every", "mlflow_tracking_uri",
                                 "mlflow_experiment"),
    "advanced": ("seed", "deterministic", "memory_budget_mb", "patches_per_slab", "slab_margin", "mix_slabs",
                 "read_ahead", "data_source", "index_uri", "identity_key_uri", "trust_index", "refresh_index", "allow_dataset_change",
                 "max_header_mb", "get_price_per_1000", "patches_per_s", "instance_usd_per_hour"),
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


def given_flags(argv: list[str]) -> frozenset:
    """The fields ``argv`` sets (whatever their values), e.g. to let a plan fill in the others."""
    parser = build_parser()
    for action in parser._actions:  # argparse's set_defaults would also convert the marker as a value
        action.default = argparse.SUPPRESS
    namespace, _ = parser.parse_known_args(argv)
    return frozenset(vars(namespace))


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
