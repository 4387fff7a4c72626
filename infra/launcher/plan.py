"""How a job will run, in words for the dry run: the image and the torch it holds, the instances and
their GPUs, the processes torchrun starts on each, and what the job will cost (its bill, forecast
from the catalog as the job will read it)."""

from __future__ import annotations

import re

from brainseg.bill import bill_text
from brainseg.flags import validate_overrides
from brainseg.io import s3
from infra.launcher.jobspec import DEFAULT_INSTANCE_TYPE, JobSpec
from infra.launcher.sagemaker_job import PINNED_TORCH

# GPUs per instance of the SageMaker families users train on; None for a type not known here.
_GPU_FAMILIES = {"g4dn": {"12xlarge": 4, "metal": 8}, "g5": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8},
                 "g6": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8}, "g6e": {"12xlarge": 4, "24xlarge": 4, "48xlarge": 8},
                 "p3": {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8}, "p3dn": {}, "p4d": {}, "p4de": {}, "p5": {},
                 "p5e": {}, "p5en": {}}
_EIGHT_GPU_FAMILIES = ("p3dn", "p4d", "p4de", "p5", "p5e", "p5en")
_CPU_FAMILIES = ("m5", "m6i", "m7i", "c5", "c6i", "c7i", "r5", "t3")


def gpus_per_instance(instance_type: str) -> int | None:
    """How many GPUs one ``ml.<family>.<size>`` instance has (0 for CPU instances), ``None`` if unknown."""
    parts = instance_type.split(".")
    if len(parts) != 3 or parts[0] != "ml":
        return None
    family, size = parts[1], parts[2]
    if family in _CPU_FAMILIES:
        return 0
    if family in _EIGHT_GPU_FAMILIES:
        return 8
    if family in _GPU_FAMILIES:
        return _GPU_FAMILIES[family].get(size, 1 if family.startswith("g") else None)
    return None


def distribution_text(spec: JobSpec, instance_type: str) -> str:
    """How the job's processes are laid out: ``torchrun, 4 processes per host (one per GPU), 8 in all``."""
    if not spec.training:
        return f"predict.py once per instance, the cases split between {spec.instance_count} instance(s)"
    gpus = gpus_per_instance(instance_type)
    if spec.processes_per_host:
        per_host, why = spec.processes_per_host, "--processes-per-host"
    elif gpus is None:
        return (f"torchrun, one process per GPU of {instance_type} (SM_NUM_GPUS; a GPU count this launcher does "
                f"not know), on {spec.instance_count} instance(s)")
    else:
        per_host, why = max(gpus, 1), "one per GPU" if gpus else "a CPU instance"
    return f"torchrun, {per_host} process(es) per host ({why}), {per_host * spec.instance_count} in all"


def image_text(image: str) -> str:
    """What runs in ``image``: the prebuilt PyTorch image's torch release, or the user's own build."""
    prebuilt = re.search(r"pytorch-training:(\d+\.\d+(?:\.\d+)?)-(cpu|gpu)-(py\d+)", image)
    if prebuilt:
        version, device, python = prebuilt.groups()
        pinned = "" if version.split(".")[:2] == PINNED_TORCH.split(".")[:2] else f", not the pinned {PINNED_TORCH}"
        return (f"{image} (SageMaker's prebuilt PyTorch training image: torch {version}{pinned}, {device}, "
                f"{python}; entry_point/requirements.txt is installed at start-up)")
    return f"{image} (your image: torch as docker/build.sh installed it, pinned {PINNED_TORCH})"


def dry_run_text(spec: JobSpec, request: dict) -> str:
    """The dry run's summary for people: where and how the job would run."""
    resources = request.get("ResourceConfig", {})
    instance_type = resources.get("InstanceType", spec.instance_type or DEFAULT_INSTANCE_TYPE)
    gpus = gpus_per_instance(instance_type)
    capacity = "spot" if request.get("EnableManagedSpotTraining") else "on-demand"
    return "\n".join([
        f"dry run: nothing was submitted; the CreateTrainingJob request of {spec.script} follows on stdout",
        f"  image:        {image_text(request.get('AlgorithmSpecification', {}).get('TrainingImage', '?'))}",
        f"  instances:    {resources.get('InstanceCount', spec.instance_count)} x {instance_type} "
        f"({'? GPUs' if gpus is None else f'{gpus} GPU(s)'} each), {capacity}, "
        f"{resources.get('VolumeSizeInGB', spec.volume_gb)} GB volume",
        f"  distribution: {distribution_text(spec, instance_type)}",
        f"  data:         {spec.data_uri} (read by ranged GETs, nothing copied first)",
        f"  output:       {spec.output_uri.rstrip('/')}/<job name>/" if spec.training else
        f"  output:       {spec.output_uri}",
    ])


def forecast_text(spec: JobSpec, request: dict) -> str:
    """The training job's bill (:mod:`brainseg.bill`): its catalog read as the job will read it (the
    headers indexed when no index is saved; the job then reuses the index), its slabs and
    validation reads replayed through its cache, its hours at the rate table's rate on the
    request's instances. A line saying why where it cannot be forecast here."""
    try:
        from brainseg.run.errors import TrainingError
        from brainseg.run.forecast import plan_bill  # the job's data stack, torch included: a dry run only
    except ImportError as err:
        return f"bill: not forecast here ({err}; pip install -r entry_point/requirements.txt to forecast it)"
    resources = request.get("ResourceConfig", {})
    instance_type = resources.get("InstanceType", spec.instance_type or DEFAULT_INSTANCE_TYPE)
    count = int(resources.get("InstanceCount", spec.instance_count))
    per_host = spec.processes_per_host or max(gpus_per_instance(instance_type) or 1, 1)
    hp = validate_overrides(spec.training_hyperparameters())
    try:
        forecast = plan_bill(hp, world=per_host * count, instance_type=instance_type, instance_count=count,
                             volume_gb=int(resources.get("VolumeSizeInGB", spec.volume_gb)))
    except (s3.S3Error, TrainingError, ValueError) as err:  # unreadable from here, no usable case, a budget too small
        return f"bill: not forecast ({err})"
    return bill_text(forecast)
