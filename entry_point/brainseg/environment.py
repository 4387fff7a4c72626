"""The SageMaker container contract, read in one place, with local fallbacks.

Inside a SageMaker training container the platform sets ``SM_*`` variables and mounts
``/opt/ml``; outside one the same fields fall back to local directories, so ``train.py`` runs
the same everywhere. Torch-free: the launcher's process mode builds this contract too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"
SAGEMAKER_CONFIG_DIR = "/opt/ml/input/config"  # SageMaker writes resourceconfig.json here


@dataclass(frozen=True)
class Environment:
    """Where a run keeps local files and who it is in the cluster.

    Attributes:
        model_dir: final model directory (``SM_MODEL_DIR``; SageMaker uploads it as model.tar.gz).
        output_data_dir: other outputs (``SM_OUTPUT_DATA_DIR``).
        checkpoint_dir: local checkpoint directory SageMaker syncs with ``CheckpointConfig``:
            ``SM_CHECKPOINT_DIR`` (our extension, used by the launcher's process mode) or
            ``/opt/ml/checkpoints`` when it exists, else ``None``.
        job_name: the training job name (``TRAINING_JOB_NAME`` or ``SM_TRAINING_ENV``), if any.
        hosts, current_host: the instances of the job (``SM_HOSTS``, ``SM_CURRENT_HOST``).
        num_gpus: GPUs on this instance (``SM_NUM_GPUS``), ``None`` outside SageMaker.
        instance_type: the instance's type (``SM_CURRENT_INSTANCE_TYPE``, else ``current_instance_type``
            of SageMaker's resourceconfig.json), ``""`` outside SageMaker.
        cache_dir: where fetched bytes are cached on this host: ``BRAINSEG_CACHE_DIR``, else the
            instance's ML storage volume (``SM_INPUT_DIR``/data/brainseg-cache) inside SageMaker,
            else ``None`` (a temporary folder).
    """

    model_dir: str
    output_data_dir: str
    checkpoint_dir: str | None
    job_name: str | None
    hosts: tuple
    current_host: str
    num_gpus: int | None
    cache_dir: str | None = None
    instance_type: str = ""


def read_environment(environ=None) -> Environment:
    """The contract from ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    training_env = json.loads(environ.get("SM_TRAINING_ENV") or "{}")
    checkpoint_dir = environ.get("SM_CHECKPOINT_DIR")
    if checkpoint_dir is None and Path(SAGEMAKER_CHECKPOINT_DIR).is_dir():
        checkpoint_dir = SAGEMAKER_CHECKPOINT_DIR
    hosts = tuple(json.loads(environ["SM_HOSTS"])) if environ.get("SM_HOSTS") else ("localhost",)
    return Environment(
        model_dir=environ.get("SM_MODEL_DIR", "model"),
        output_data_dir=environ.get("SM_OUTPUT_DATA_DIR", "output"),
        checkpoint_dir=checkpoint_dir,
        job_name=environ.get("TRAINING_JOB_NAME") or training_env.get("job_name"),
        hosts=hosts,
        current_host=environ.get("SM_CURRENT_HOST", hosts[0]),
        num_gpus=int(environ["SM_NUM_GPUS"]) if environ.get("SM_NUM_GPUS") else None,
        cache_dir=environ.get("BRAINSEG_CACHE_DIR") or (str(Path(environ["SM_INPUT_DIR"]) / "data" / "brainseg-cache")
                                                        if environ.get("SM_INPUT_DIR") else None),
        instance_type=environ.get("SM_CURRENT_INSTANCE_TYPE") or _resource_config(environ).get("current_instance_type", ""),
    )


def _resource_config(environ) -> dict:
    """SageMaker's ``resourceconfig.json`` (``{}`` where there is none, as outside SageMaker)."""
    path = Path(environ.get("SM_INPUT_CONFIG_DIR", SAGEMAKER_CONFIG_DIR)) / "resourceconfig.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def drop_privileges(env: Environment, user: str | None = None) -> str | None:
    """Continue as the unprivileged ``user`` (default ``$BRAINSEG_RUN_AS``) when started as root.

    SageMaker's bootstrap needs root (it makes its driver script executable and mounts root-owned
    ``/opt/ml`` directories), but parsing DICOM from a bucket does not: the training image sets
    ``BRAINSEG_RUN_AS``, and the script hands the directories it writes to that user and drops
    root before reading any data. Returns the user switched to, or ``None``.
    """
    user = user or os.environ.get("BRAINSEG_RUN_AS")
    if not user or os.geteuid() != 0:
        return None
    import pwd

    account = pwd.getpwnam(user)
    for directory in (env.model_dir, env.output_data_dir, env.checkpoint_dir):
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            os.chown(directory, account.pw_uid, account.pw_gid)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    os.environ["HOME"] = account.pw_dir
    return user


def cpu_image_warning(env: Environment, cuda_available: bool, torch_version: str, cuda_runtime: str | None = None
                      ) -> str:
    """What to say when the instance has GPUs (``SM_NUM_GPUS`` > 0) that torch cannot see: a CPU
    image, or a CPU build of torch, on a GPU instance, or (``cuda_runtime``: the CUDA torch was
    built for) a CUDA build whose runtime the host's driver does not support; "" otherwise."""
    if not env.num_gpus or cuda_available:
        return ""
    slower = "Training runs on the CPU, many times slower, at the GPU instance's price."
    if cuda_runtime:
        return (f"SM_NUM_GPUS={env.num_gpus} but torch {torch_version}, built for CUDA {cuda_runtime}, sees no CUDA "
                f"device: the host's NVIDIA driver is likely older than CUDA {cuda_runtime} needs (13.x: R580 or "
                f"later; 12.x: R525). {slower} Build the image for an older CUDA (VARIANT=cuda TORCH_INDEX="
                "https://download.pytorch.org/whl/cu126 bash docker/build.sh) and pass it as --image-uri, or stop "
                "this job")
    return (f"SM_NUM_GPUS={env.num_gpus} but torch {torch_version} sees no CUDA device: a CPU image (or a CPU build "
            f"of torch) on a GPU instance. {slower} Build and push the CUDA image (VARIANT=cuda bash "
            "docker/build.sh) and pass it as --image-uri, or stop this job")

