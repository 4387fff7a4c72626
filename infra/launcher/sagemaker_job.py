"""The ``aws`` and ``local`` modes: a SageMaker SDK v3 ``ModelTrainer`` built from a :class:`JobSpec`.

``aws`` submits a real CreateTrainingJob; ``local`` runs the same job in SageMaker local mode
(``Mode.LOCAL_CONTAINER``) with a locally built image. The dataset is never a channel: train.py
reads it from ``data_uri`` by ranged GETs, so only the source code travels as a channel.
``dry_run_request`` builds the exact CreateTrainingJob request offline: the SDK runs against a
session whose every AWS call is answered here (no credentials, network or bucket needed), and the
request is caught before it would be sent.

The SDK reads the user's SageMaker config (admin and user files, as it always does: their defaults
for VPC, KMS keys, tags, role) and we add only ``TelemetryOptOut: true`` where they did not set it.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import boto3
import botocore.exceptions
from botocore.awsrequest import AWSResponse

from brainseg.metric_lines import METRIC_DEFINITIONS
from infra.launcher.iam import role_account
from infra.launcher.jobspec import DEFAULT_INSTANCE_TYPE, ENTRY_POINT, JobSpec

PINNED_TORCH = "2.13.0"  # requirements.txt's pin, and the image's (docker/build.sh)
logger = logging.getLogger("launch")
DRY_RUN_REGION = "us-east-1"  # a dry run without a configured region
IGNORED = {".env", ".git", "__pycache__", ".pytest_cache"}  # never shipped with the code


class LaunchError(RuntimeError):
    """The job cannot be submitted; the message says why and what to do."""


class _DryRun(Exception):
    def __init__(self, request: dict):
        super().__init__("dry run")
        self.request = request


class _SdkNoise(logging.Filter):
    """Drops an SDK warning that says nothing to this launcher's user: a client it builds for itself
    without the session's region says "No region provided" although the job has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "No region provided. Using default region."


def _quiet_sdk() -> None:
    """The SDK's own lines kept to what matters: it sets its config logger to INFO at import (which
    config files it did not find, on every call)."""
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    utils = logging.getLogger("sagemaker.core.utils.utils")
    if not any(isinstance(item, _SdkNoise) for item in utils.filters):
        utils.addFilter(_SdkNoise())


def _sdk():
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.shapes import MetricDefinition, RetryStrategy, Tag
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        Networking,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun
    from sagemaker.train.model_trainer import Mode
    _quiet_sdk()
    return SimpleNamespace(Session=Session, CheckpointConfig=CheckpointConfig, Compute=Compute, Networking=Networking,
                           OutputDataConfig=OutputDataConfig, SourceCode=SourceCode,
                           StoppingCondition=StoppingCondition, MetricDefinition=MetricDefinition, Tag=Tag,
                           RetryStrategy=RetryStrategy, ModelTrainer=ModelTrainer, Torchrun=Torchrun, Mode=Mode)


def sagemaker_config() -> dict:
    """The user's SageMaker config as the SDK loads it (admin file, then user file, their override
    variables honoured), with telemetry off unless they set ``TelemetryOptOut`` themselves (the SDK
    would otherwise call out to AWS on every job it starts)."""
    from sagemaker.core.config.config import load_sagemaker_config
    _quiet_sdk()
    try:
        config = load_sagemaker_config()
    except (ValueError, OSError) as err:
        raise LaunchError(f"the SageMaker config file cannot be used: {err}") from None
    modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
    modules.setdefault("TelemetryOptOut", True)
    config.setdefault("SchemaVersion", "1.0")
    return config


def config_settings(config: dict) -> dict:
    """The job settings the user's SageMaker config gives under ``SageMaker.TrainingJob`` (role,
    VPC, KMS keys, tags, environment, inter-container encryption), as :class:`JobSpec` fields. SDK v3's
    ModelTrainer reads few of these itself, so the launcher applies them where no flag says otherwise."""
    job = config.get("SageMaker", {}).get("TrainingJob", {})
    vpc = job.get("VpcConfig", {})
    settings = {
        "role": job.get("RoleArn"),
        "subnets": tuple(vpc.get("Subnets", ())),
        "security_group_ids": tuple(vpc.get("SecurityGroupIds", ())),
        "output_kms_key": job.get("OutputDataConfig", {}).get("KmsKeyId"),
        "volume_kms_key": job.get("ResourceConfig", {}).get("VolumeKmsKeyId"),
        "inter_container_encryption": job.get("EnableInterContainerTrafficEncryption"),
        "network_isolation": job.get("EnableNetworkIsolation"),
        "tags": {tag["Key"]: tag["Value"] for tag in job.get("Tags", ())},
        "environment": dict(job.get("Environment", {})),
    }
    return {name: value for name, value in settings.items() if value not in (None, (), {})}


def prebuilt_pytorch() -> tuple[str, str]:
    """``(version, py_version)`` of SageMaker's prebuilt PyTorch training image for the pinned torch
    (:data:`PINNED_TORCH`): that release when the SDK knows one, else the newest it knows, with a
    warning that the job will not run the pinned version."""
    from sagemaker.core.image_uris import config_for_framework
    versions = config_for_framework("pytorch")["training"]["versions"]
    release = lambda version: tuple(int(part) for part in version.split("."))
    matching = [v for v in versions if release(v)[:2] == release(PINNED_TORCH)[:2]]
    newest = max(versions, key=release)
    version = max(matching, key=release) if matching else newest
    if not matching:
        logger.warning("SageMaker has no prebuilt PyTorch %s training image (newest known: %s): the job runs torch %s "
                       "instead of the pinned %s; for the pinned versions build the CUDA image "
                       "(VARIANT=cuda bash docker/build.sh), push it to ECR and pass --image-uri", PINNED_TORCH, newest,
                       newest, PINNED_TORCH)
    return version, versions[version]["py_versions"][-1]


def training_image(spec: JobSpec, region: str) -> tuple[str, str | None]:
    """``(image URI, requirements file)``: the given image as is, or the prebuilt PyTorch training
    image plus ``entry_point/requirements.txt`` installed at start-up."""
    if spec.image_uri:
        return spec.image_uri, None
    if spec.mode == "local":
        raise LaunchError("local mode needs --image-uri: the tag of the image built by docker/build.sh "
                          "(e.g. brainseg-train:latest)")
    from sagemaker.core import image_uris
    version, py_version = prebuilt_pytorch()
    image = image_uris.retrieve("pytorch", region=region, version=version, py_version=py_version,
                                instance_type=spec.instance_type or DEFAULT_INSTANCE_TYPE, image_scope="training")
    return image, "requirements.txt"


def build_trainer(spec: JobSpec, boto_session: boto3.Session, environment: dict | None = None,
                  local_root: str | None = None, source_dir: str | None = None):
    """The ``ModelTrainer`` for ``spec`` (``aws`` or ``local``); ``source_dir`` an s3:// tar.gz of
    entry_point/ instead of the folder itself."""
    sdk = _sdk()
    region = boto_session.region_name
    out_bucket, _, out_prefix = spec.output_uri[len("s3://"):].partition("/")
    session = sdk.Session(boto_session=boto_session, default_bucket=out_bucket,
                          default_bucket_prefix=out_prefix.strip("/") or None, sagemaker_config=sagemaker_config())
    image, requirements = training_image(spec, region)
    local = spec.mode == "local"
    compute = sdk.Compute(
        instance_type="local" if local else (spec.instance_type or DEFAULT_INSTANCE_TYPE),
        instance_count=spec.instance_count, volume_size_in_gb=spec.volume_gb,
        volume_kms_key_id=spec.volume_kms_key or None, enable_managed_spot_training=spec.spot or None,
        keep_alive_period_in_seconds=spec.keep_alive_s or None)
    networking = None
    if spec.subnets or spec.security_group_ids or spec.network_isolation or spec.inter_container_encryption:
        networking = sdk.Networking(subnets=list(spec.subnets) or None,
                                       security_group_ids=list(spec.security_group_ids) or None,
                                       enable_network_isolation=spec.network_isolation or None,
                                       enable_inter_container_traffic_encryption=spec.inter_container_encryption or None)
    stopping = sdk.StoppingCondition(max_runtime_in_seconds=spec.max_run_s,
                                        max_wait_time_in_seconds=spec.max_wait if spec.spot else None)
    # Training always runs under SageMaker's torchrun driver: one process per GPU of every instance
    # (SM_NUM_GPUS; one on CPU instances) unless --processes-per-host says otherwise.
    distributed = sdk.Torchrun(process_count_per_node=spec.processes_per_host or None) if spec.training else None
    trainer = sdk.ModelTrainer(
        training_mode=sdk.Mode.LOCAL_CONTAINER if local else sdk.Mode.SAGEMAKER_TRAINING_JOB,
        sagemaker_session=session,
        role=spec.role or None,
        base_job_name=spec.base_job_name(),
        training_image=image,
        source_code=sdk.SourceCode(source_dir=source_dir or str(ENTRY_POINT), entry_script=spec.script,
                                      requirements=requirements,
                                      ignore_patterns=sorted(IGNORED)),
        compute=compute,
        networking=networking,
        stopping_condition=stopping,
        distributed=distributed,
        output_data_config=sdk.OutputDataConfig(s3_output_path=spec.output_uri.rstrip("/") + "/",
                                                   kms_key_id=spec.output_kms_key or None),
        hyperparameters=spec.training_hyperparameters(),
        environment={**spec.environment, **(environment or {})},
        tags=[sdk.Tag(key=k, value=str(v)) for k, v in spec.tags.items()] or None,
        **({"local_container_root": local_root} if local_root else {}),
    )
    trainer = trainer.with_metric_definitions([sdk.MetricDefinition(name=d["Name"], regex=d["Regex"])
                                               for d in METRIC_DEFINITIONS])
    if spec.max_retries:
        trainer = trainer.with_retry_strategy(sdk.RetryStrategy(maximum_retry_attempts=spec.max_retries))
    if not local and spec.training:
        # SageMaker syncs /opt/ml/checkpoints with <output>/<base name>/<job>/checkpoints (the SDK's
        # per-job default under our default bucket and prefix) across spot interruptions; train.py
        # also writes its own under <output>/<job>/checkpoints/ and resumes from the newer.
        trainer = trainer.with_checkpoint_config(sdk.CheckpointConfig(local_path="/opt/ml/checkpoints"))
    return trainer


def offline_session(spec: JobSpec) -> boto3.Session:
    """A boto3 session that never reaches AWS: placeholder credentials, and every call answered
    here with what the SDK needs to go on (the output bucket exists, uploads succeed). The request
    that would start the job is raised as :class:`_DryRun`."""
    region = spec.region or boto3.Session().region_name or DRY_RUN_REGION
    session = boto3.Session(region_name=region, aws_access_key_id="dry-run", aws_secret_access_key="dry-run")
    bucket = spec.output_uri[len("s3://"):].partition("/")[0]
    account = role_account(spec.role)
    answers = {
        "ListBuckets": {"Buckets": [{"Name": bucket, "CreationDate": datetime.datetime.now(datetime.UTC)}]},
        "GetCallerIdentity": {"Account": account, "Arn": spec.role, "UserId": "dry-run"},
        "CreateMultipartUpload": {"UploadId": "dry-run"},
    }

    def answer(model, **_):
        return AWSResponse("https://dry-run.invalid", 200, {}, None), {"ETag": '"dry-run"', **answers.get(model.name, {})}

    def capture(params, **_):
        raise _DryRun(params)
    for operation in ("CreateTrainingJob", "CreateHyperParameterTuningJob"):
        session.events.register(f"before-parameter-build.sagemaker.{operation}", capture)
    session.events.register("before-call", answer)
    return session


@contextlib.contextmanager
def _no_role_validation():
    """The SDK checks the role against IAM before submitting; a dry run is offline."""
    saved = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SAGEMAKER_VALIDATE_ROLE")
        else:
            os.environ["SAGEMAKER_VALIDATE_ROLE"] = saved


def dry_run_request(spec: JobSpec) -> dict:
    """The CreateTrainingJob request ``spec`` would send, built offline; nothing is uploaded or submitted."""
    try:
        with _no_role_validation():
            build_trainer(spec, offline_session(spec)).train(wait=False, logs=False)
    except _DryRun as captured:
        return captured.request
    raise LaunchError("the SDK returned without calling CreateTrainingJob")


def upload_source(uri: str, boto_session: boto3.Session) -> None:
    """entry_point/ as a tar.gz at ``uri`` (what a tuning job's containers unpack as their code)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(ENTRY_POINT.rglob("*")):
            if path.is_file() and not set(path.relative_to(ENTRY_POINT).parts) & IGNORED:
                archive.add(path, arcname=path.relative_to(ENTRY_POINT).as_posix())
    bucket, _, key = uri[len("s3://"):].partition("/")
    boto_session.client("s3").put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


def build_tuner(spec: JobSpec, tuning, name: str, boto_session: boto3.Session):
    """SageMaker's ``HyperparameterTuner`` for ``tuning`` over the training job ``spec`` describes.

    The code goes up as one tar.gz under the tuning job's folder of the output prefix (the SDK
    would put it at the bucket's root, outside what the job role may read), and the job definition
    gets what the SDK leaves out of it: the volume's KMS key, inter-container encryption and the
    checkpoint location."""
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
    from sagemaker.core.shapes import HyperbandStrategyConfig, HyperParameterTuningJobStrategyConfig
    from sagemaker.train.tuner import HyperparameterTuner

    from brainseg.config import Hyperparameters
    folder = f"{spec.output_uri.rstrip('/')}/{name}/"
    source = folder + "input/sourcedir.tar.gz"
    upload_source(source, boto_session)
    trainer = build_trainer(spec, boto_session, source_dir=source)
    # The tuning API has no container entrypoint: the prebuilt PyTorch image's own launcher runs
    # train.py, and this asks it for torchrun (one process per GPU), as the driver does elsewhere.
    trainer.hyperparameters["sagemaker_torch_distributed_enabled"] = "true"

    def complete(params, **_):
        definition = params["TrainingJobDefinition"]
        if spec.volume_kms_key:
            definition["ResourceConfig"]["VolumeKmsKeyId"] = spec.volume_kms_key
        if spec.inter_container_encryption:
            definition["EnableInterContainerTrafficEncryption"] = True
        definition.setdefault("CheckpointConfig", {}).update(S3Uri=folder + "checkpoints",
                                                             LocalPath="/opt/ml/checkpoints")
    boto_session.events.register_first("before-parameter-build.sagemaker.CreateHyperParameterTuningJob", complete)
    ranges = {}
    for r in tuning.ranges:
        if r.kind == "categorical":
            ranges[r.name] = CategoricalParameter([v if isinstance(v, str) else json.dumps(v) for v in r.values])
        elif r.kind == "integer":
            ranges[r.name] = IntegerParameter(int(r.low), int(r.high), scaling_type=r.scaling)
        else:
            ranges[r.name] = ContinuousParameter(r.low, r.high, scaling_type=r.scaling)
    metric, objective_type = tuning.objective_for(spec.hyperparameters.get("task", Hyperparameters.task))
    strategy_config = None
    if tuning.strategy == "Hyperband":
        epochs = int(spec.hyperparameters.get("epochs", Hyperparameters.epochs))
        strategy_config = HyperParameterTuningJobStrategyConfig(hyperband_strategy_config=HyperbandStrategyConfig(
            min_resource=min(tuning.min_epochs, epochs), max_resource=epochs))
    return HyperparameterTuner(
        model_trainer=trainer, objective_metric_name=metric, objective_type=objective_type,
        hyperparameter_ranges=ranges, metric_definitions=METRIC_DEFINITIONS, strategy=tuning.strategy,
        strategy_config=strategy_config, max_jobs=tuning.jobs, max_parallel_jobs=tuning.max_parallel_jobs,
        early_stopping_type=tuning.early_stopping, random_seed=tuning.random_seed or None,
        base_tuning_job_name=name)


def dry_run_tuning_request(spec: JobSpec, tuning, name: str) -> dict:
    """The CreateHyperParameterTuningJob request, built offline like :func:`dry_run_request`."""
    try:
        with _no_role_validation():
            build_tuner(spec, tuning, name, offline_session(spec)).tune(job_name=name, wait=False)
    except _DryRun as captured:
        return captured.request
    raise LaunchError("the SDK returned without calling CreateHyperParameterTuningJob")


def submit_tuning(spec: JobSpec, tuning, name: str, boto_session: boto3.Session) -> None:
    """Create the tuning job ``name`` (its training jobs start on SageMaker's side); with
    ``spec.wait``, wait until it ends."""
    check_account(boto_session, spec.output_uri)
    build_tuner(spec, tuning, name, boto_session).tune(job_name=name, wait=spec.wait)


def check_account(session: boto3.Session, output_uri: str) -> None:
    """One clear line instead of a traceback when a real submit cannot work: no credentials, or an
    output bucket that does not exist or cannot be reached with them."""
    if session.get_credentials() is None:
        raise LaunchError("no AWS credentials found (environment, ~/.aws, SSO or instance role); configure them, "
                          "or use --dry-run to print the request offline")
    bucket = output_uri[len("s3://"):].partition("/")[0]
    try:
        session.client("s3").head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise LaunchError(f"output bucket {bucket} does not exist (create it, or pass another --output-uri)") from None
        if code in ("403", "AccessDenied"):
            raise LaunchError(f"output bucket {bucket}: access denied with these credentials") from None
        raise LaunchError(f"output bucket {bucket}: {code or err}") from None
    except botocore.exceptions.NoCredentialsError:
        raise LaunchError("no AWS credentials found; configure them, or use --dry-run") from None
    except botocore.exceptions.BotoCoreError as err:
        raise LaunchError(f"cannot reach S3 to check output bucket {bucket}: {err}") from None


def submit(spec: JobSpec, boto_session: boto3.Session, environment: dict | None = None,
           local_root: str | None = None) -> str | None:
    """Submit (aws: returns the job name) or run to the end (local: the SDK names the job itself
    and does not return the name; the run is found under the output URI)."""
    if spec.mode == "aws":
        check_account(boto_session, spec.output_uri)
        created = {}  # the job name, read from the CreateTrainingJob request as it is sent
        boto_session.events.register("before-parameter-build.sagemaker.CreateTrainingJob",
                                     lambda params, **_: created.update(name=params["TrainingJobName"]))
        trainer = build_trainer(spec, boto_session, environment, local_root)
        trainer.train(wait=spec.wait, logs=spec.wait)
        return created["name"]
    check_docker(spec.image_uri)
    trainer = build_trainer(spec, boto_session, environment, local_root)
    try:
        trainer.train(wait=True, logs=True)
    except RuntimeError as err:
        raise LaunchError(f"the local-mode container failed (its output is above): {err}") from None
    finally:
        cleanup_local(local_root)
    return None


def cleanup_local(local_root: str | None) -> None:
    """Remove what local mode leaves behind: the job's exited containers and its compose network."""
    compose = Path(local_root or "") / "docker-compose.yaml"
    if local_root and compose.is_file():
        subprocess.run(["docker-compose", "-f", str(compose), "rm", "-f", "-s"], capture_output=True, timeout=120)
    subprocess.run(["docker", "network", "rm", "sagemaker-local"], capture_output=True, timeout=60)


def check_docker(image: str) -> None:
    """Fail with one clear line when Docker is not running or the image is not built."""
    if not image:
        raise LaunchError("local mode needs --image-uri: build it with docker/build.sh")
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        raise LaunchError("docker is not installed; install docker (and docker-compose) or use --mode process") from None
    if info.returncode != 0:
        raise LaunchError("Docker is not running (`docker info` failed: "
                          f"{(info.stderr or info.stdout).strip().splitlines()[-1:] or ['no output']}); start dockerd "
                          "or use --mode process")
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, timeout=30)
    if inspect.returncode != 0:
        raise LaunchError(f"image {image} is not present locally (local mode never pulls it); build it with "
                          "`bash docker/build.sh` or pass another --image-uri")
