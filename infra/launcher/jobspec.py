"""What a job is, independent of where it runs: the launcher's settings, checked. A job runs
train.py (training) or predict.py (prediction: a batch job on the same image and contract).

No torch and no SageMaker SDK here: ``brainseg-launch`` (:mod:`infra.launcher.cli`) builds a :class:`JobSpec` from its flags and an
optional YAML file, then hands it to one of the runners (``sagemaker_job`` for ``aws``/``local``,
``process_job`` for ``process``). Also here: the hyperparameters as SageMaker passes them on the
command line (the metric definitions are in :mod:`brainseg.metric_lines`, the IAM policies in
:mod:`infra.launcher.iam`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

import yaml

from brainseg.flags import validate_overrides
from brainseg.io import s3
from brainseg.prediction.options import validate_predict_overrides
from infra.launcher.iam import role_account

MODES = ("process", "local", "aws")
SCRIPTS = ("train.py", "predict.py")
# The SageMaker source dir: train.py and the brainseg package, nothing else (infra stays out of the job).
ENTRY_POINT = Path(__file__).resolve().parents[2] / "entry_point"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"  # aws mode; local mode runs on "local"
DEFAULT_VOLUME_GB = 100  # aws mode: the volume when nothing sized it to the data (infra.launcher.storage)
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
MAX_KEEP_ALIVE_S = 3600  # SageMaker's limit for a warm pool's keep-alive period
MAX_RETRIES = 30  # SageMaker's limit for RetryStrategy.MaximumRetryAttempts


@dataclass(frozen=True)
class JobSpec:
    """A job. ``hyperparameters`` are the overrides passed to its script (validated): train.py's
    hyperparameters, or predict.py's options."""

    mode: str = "process"
    script: str = "train.py"
    data_uri: str = ""
    output_uri: str = ""
    hyperparameters: dict = field(default_factory=dict)
    job_name: str = ""
    image_uri: str = ""
    role: str = ""
    region: str = ""
    instance_type: str = ""
    instance_count: int = 1
    processes_per_host: int = 0  # 0: one per GPU (SageMaker's default), 1 on CPU
    keep_alive_s: int = 0  # aws: keep the instances warm this long after the job (a warm pool)
    max_retries: int = 0  # aws: restart the job on an internal SageMaker error up to this many times
    volume_size_gb: int = 0  # 0: sized to the data's cache by the launcher, else DEFAULT_VOLUME_GB
    spot: bool = False
    max_run_s: int = 24 * 3600
    max_wait_s: int = 0  # spot only; 0: twice max_run_s
    volume_kms_key: str = ""
    output_kms_key: str = ""
    subnets: tuple = ()
    security_group_ids: tuple = ()
    network_isolation: bool = False
    inter_container_encryption: bool = False
    tags: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # the container's variables (aws and local modes)
    wait: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("data_uri", "output_uri"):
            value = getattr(self, name)
            if value:
                s3.parse_uri(value)
        if self.mode == "aws":
            if not self.data_uri or not self.output_uri:
                raise ValueError("aws mode needs --data-uri and --output-uri (s3:// URIs the job's role can read "
                                 "and write)")
            if not self.role:
                raise ValueError("aws mode needs --role: the ARN of the IAM role the training job runs as "
                                 "(`brainseg-launch iam-policy ...` prints the policy it needs)")
        if self.role:
            role_account(self.role)
        if self.dry_run and self.mode != "aws":
            raise ValueError("--dry-run prints a CreateTrainingJob request, so it needs --mode aws")
        if self.instance_count < 1:
            raise ValueError(f"instance_count {self.instance_count}: expected at least 1")
        if self.spot and self.max_wait_s and self.max_wait_s < self.max_run_s:
            raise ValueError(f"max_wait_s {self.max_wait_s} is below max_run_s {self.max_run_s}; spot jobs need "
                             "max wait >= max run")
        if not 0 <= self.keep_alive_s <= MAX_KEEP_ALIVE_S:
            raise ValueError(f"keep_alive_s {self.keep_alive_s}: expected 0 to {MAX_KEEP_ALIVE_S} seconds")
        if self.keep_alive_s and (self.mode != "aws" or self.spot):
            raise ValueError("keep_alive_s keeps a warm pool of SageMaker instances: it needs --mode aws and "
                             "on-demand capacity (SageMaker has no warm pools for spot jobs)")
        if not 0 <= self.max_retries <= MAX_RETRIES:
            raise ValueError(f"max_retries {self.max_retries}: expected 0 to {MAX_RETRIES}")
        if self.processes_per_host < 0:
            raise ValueError(f"processes_per_host {self.processes_per_host}: expected 0 (one per GPU) or more")
        if self.job_name and not JOB_NAME.fullmatch(self.job_name):
            raise ValueError(f"job_name {self.job_name!r}: expected 1-63 letters, digits and hyphens")
        if self.network_isolation and self.mode == "aws":
            raise ValueError("network_isolation cuts the container off from S3, and train.py reads its data "
                             "and writes its artifacts over S3 itself; use VPC subnets with an S3 gateway "
                             "endpoint instead")
        if self.script not in SCRIPTS:
            raise ValueError(f"script {self.script!r}: expected one of {', '.join(SCRIPTS)}")
        reserved = (("data_uri", "--data-uri"), ("output_uri", "--output-uri"), ("run_name", "--job-name"))
        for name, flag in reserved[:None if self.training else 2]:
            if name in self.hyperparameters:
                raise ValueError(f"hyperparameter {name} is set by the launcher; use {flag}")
        locations = {"data_uri": self.data_uri or "s3://placeholder-data/",
                     "output_uri": self.output_uri or "s3://placeholder-output/"}
        # The real URIs when known, so a dataset/output overlap is refused before anything is submitted.
        if self.training:
            checked = validate_overrides({**self.hyperparameters, **locations})
            # Canonical values ("32,32,32" -> [32, 32, 32], "false" -> False), as train.py will read them.
            canonical = {name: _plain(getattr(checked, name)) for name in self.hyperparameters}
        else:
            checked = validate_predict_overrides({**self.hyperparameters, **locations})
            # Lists as predict.py reads them: comma-separated text.
            canonical = {name: ",".join(value) if isinstance(value := getattr(checked, name), tuple) else value
                         for name in self.hyperparameters}
        object.__setattr__(self, "hyperparameters", canonical)

    @property
    def volume_gb(self) -> int:
        """The instance volume the request asks for."""
        return self.volume_size_gb or DEFAULT_VOLUME_GB

    @property
    def training(self) -> bool:
        return self.script == "train.py"

    @property
    def max_wait(self) -> int:
        return self.max_wait_s or 2 * self.max_run_s

    def base_job_name(self) -> str:
        return self.job_name or "brainseg"

    def unique_job_name(self) -> str:
        """A job name for runners that name jobs themselves (process mode), in the form SDK v3's
        ModelTrainer gives aws and local jobs: ``<base>-YYYYMMDDHHMMSS`` (local time)."""
        return unique_name(self.base_job_name())

    def training_hyperparameters(self) -> dict:
        """The hyperparameters the job is given: the overrides plus the data and output URIs.
        A training run is named after the job (train.py reads ``TRAINING_JOB_NAME``)."""
        return {**self.hyperparameters, "data_uri": self.data_uri, "output_uri": self.output_uri}


def unique_name(base: str) -> str:
    """``<base>-YYYYMMDDHHMMSS``, at most 63 characters, as SDK v3 names training jobs."""
    return f"{base.replace('_', '-')}-{datetime.now():%Y%m%d%H%M%S}"[:63]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def sagemaker_cli_args(hyperparameters: dict) -> list[str]:
    """Hyperparameters as SageMaker's training drivers pass them to the entry script:
    ``--key value``, strings as they are and everything else JSON-encoded."""
    args = []
    for key, value in hyperparameters.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _parse_value(text: str):
    """A ``--hp`` value: YAML scalars and lists (``true``, ``3``, ``[32, 32, 32]``), else the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=0.001", "patch_size=[64,64,64]"]`` → ``{"lr": 0.001, ...}``; keys may use - or _."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hp {pair!r}: expected key=value, e.g. --hp lr=0.001")
        overrides[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return overrides


def read_yaml(path: str, flag: str) -> dict:
    """The mapping in the YAML file ``path`` given with ``flag``; ValueError saying what is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{flag} {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_config(path: str | None) -> dict:
    """A YAML job file: launcher settings at the top level, train.py's under ``hyperparameters``."""
    if not path:
        return {}
    data = read_yaml(path, "--config")
    known = {f.name for f in fields(JobSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def build_spec(settings: dict, overrides: dict) -> JobSpec:
    """A checked JobSpec from YAML/CLI settings plus ``--hp`` overrides (which win)."""
    settings = dict(settings)
    hyperparameters = {str(k).replace("-", "_"): v for k, v in (settings.pop("hyperparameters", None) or {}).items()}
    hyperparameters.update(overrides)
    for name in ("subnets", "security_group_ids"):
        if isinstance(settings.get(name), str):
            settings[name] = tuple(v for v in settings[name].split(",") if v)
        elif settings.get(name) is not None:
            settings[name] = tuple(settings[name])
    return JobSpec(**settings, hyperparameters=hyperparameters)


