"""A training job's bill by one formula, forecast before launch and counted after: steps and
patches, hours at a patch rate, the instances' cost on demand and on spot, the S3 request fees of
the first and of later epochs, and the volume.

The forecast takes its patch rate from :data:`GPU_PATCHES_PER_S` (or the user's) and its reads from
:mod:`brainseg.run.forecast`; a run's summary applies the same :func:`bill` to what it measured (its
patch rate, its epoch lines' GETs and bytes), so the two can be set side by side. Free of torch, as
:mod:`brainseg.config`: the launcher prints a bill on a laptop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Training patches per second on one GPU: four-channel 128^3 patches, batch 2 per GPU, mixed
# precision, NVIDIA's nnU-Net (a U-Net the size of ours or larger). Published figures first
# (NVIDIA DeepLearningExamples, PyTorch/Segmentation/nnUNet/README.md, "Training performance":
# DGX A100 80GB and DGX-1 V100 16GB, dim 3, 1 GPU, batch 2, mixed precision); for GPUs without one,
# an estimate: the V100's figure times the square root of the GPU's memory bandwidth over the
# V100's 900 GB/s (a 3D U-Net at batch 2 is bound by memory traffic more than by tensor FLOPs:
# the A100's published figure is 1.23x the V100's, its bandwidth 2.3x, its FP16 FLOPs 2.5x).
V100_PATCHES_PER_S = 5.49
GPU_PATCHES_PER_S = {
    "A100": (6.74, "published: NVIDIA nnU-Net, DGX A100"),
    "V100": (V100_PATCHES_PER_S, "published: NVIDIA nnU-Net, DGX-1 V100"),
    **{gpu: (round(V100_PATCHES_PER_S * math.sqrt(bandwidth / 900.0), 2),
             f"estimated: the V100's figure x sqrt({bandwidth:g}/900 GB/s memory bandwidth)")
       for gpu, bandwidth in {"T4": 320, "A10G": 600, "L4": 300, "L40S": 864, "H100": 3350, "H200": 4800}.items()},
}
REFERENCE_PATCH = (4, 128, 128, 128)  # the table's patch: channels, D, H, W
# SageMaker training, on demand, us-east-1, USD per instance-hour, as this table holds them from
# aws.amazon.com/sagemaker/pricing (not looked up at run time, and not re-checked against the page
# in this offline build: prices change; --instance-usd-per-hour overrides).
INSTANCES = {  # type: (GPU model, GPUs, on-demand USD per hour)
    "ml.g4dn.xlarge": ("T4", 1, 0.736), "ml.g4dn.2xlarge": ("T4", 1, 0.94), "ml.g4dn.12xlarge": ("T4", 4, 4.89),
    "ml.g5.xlarge": ("A10G", 1, 1.408), "ml.g5.2xlarge": ("A10G", 1, 1.515), "ml.g5.4xlarge": ("A10G", 1, 2.03),
    "ml.g5.8xlarge": ("A10G", 1, 3.06), "ml.g5.12xlarge": ("A10G", 4, 7.09), "ml.g5.24xlarge": ("A10G", 4, 10.18),
    "ml.g5.48xlarge": ("A10G", 8, 20.36),
    "ml.p3.2xlarge": ("V100", 1, 3.825), "ml.p3.8xlarge": ("V100", 4, 14.688), "ml.p3.16xlarge": ("V100", 8, 28.152),
    "ml.p4d.24xlarge": ("A100", 8, 37.688), "ml.p5.48xlarge": ("H100", 8, 113.07),
    "ml.m5.xlarge": ("", 0, 0.23), "ml.m5.2xlarge": ("", 0, 0.461), "ml.m5.4xlarge": ("", 0, 0.922),
    "ml.c5.xlarge": ("", 0, 0.204), "ml.c5.2xlarge": ("", 0, 0.408),
}
SPOT_SAVING = 0.7  # an assumption: AWS quotes "up to 90%"; the job's billable seconds give the real figure
VOLUME_USD_PER_GB_MONTH = 0.14  # SageMaker ML storage (gp2), us-east-1, from the same page
HOURS_PER_MONTH = 730.0


@dataclass(frozen=True)
class Bill:
    """What a run costs: ``hours`` of training at ``patches_per_s`` (``None`` where no rate is known),
    the instances at on-demand and spot prices, and the GETs, bytes and request fees of the first
    epoch, of an average later epoch and of the run."""

    steps: int
    patches: int
    patches_per_s: float | None
    rate_source: str
    hours: float | None
    instance_type: str
    instance_count: int
    on_demand_usd: float | None
    spot_usd: float | None
    volume_gb: int
    volume_usd: float | None
    gets_first_epoch: int
    mib_first_epoch: float
    gets_later_epoch: float
    mib_later_epoch: float
    gets: int
    mib: float
    request_usd_first_epoch: float
    request_usd_later_epoch: float
    request_usd: float

    def to_json(self) -> dict:
        return {key: round(value, 6) if isinstance(value, float) else value for key, value in asdict(self).items()}


def patch_rate(instance_type: str, patch: tuple, instance_count: int = 1) -> tuple[float | None, str]:
    """Training patches per second of ``instance_count`` instances of ``instance_type`` on patches of
    ``patch`` ``(channels, D, H, W)``: the table's per-GPU rate times the GPUs, scaled by the
    voxels of the table's patch over ``patch``'s; ``None`` (and why) for an instance without one."""
    gpu, gpus, _ = INSTANCES.get(instance_type, ("?", 0, None))
    if gpu == "?":
        return None, f"{instance_type or 'this machine'} is not in the rate table: give --patches-per-s"
    if not gpus:
        return None, f"{instance_type} has no GPU: no rate in the table (give --patches-per-s)"
    rate, source = GPU_PATCHES_PER_S[gpu]
    scale = math.prod(REFERENCE_PATCH) / math.prod(patch)
    return rate * gpus * instance_count * scale, f"{gpu} x {gpus * instance_count}, {source}"


def bill(*, steps: int, patches_per_step: int, patches_per_s: float | None, rate_source: str, instance_type: str,
         instance_count: int, epoch_gets: list[int], epoch_bytes: list[int], get_usd_per_1000: float,
         volume_gb: int, usd_per_hour: float | None = None, hours: float | None = None) -> Bill:
    """The bill of ``steps`` steps of ``patches_per_step`` patches: ``hours`` (else patches over
    ``patches_per_s``), the instances at ``usd_per_hour`` each (else the table's), and per-epoch
    GETs and bytes at ``get_usd_per_1000``."""
    patches = steps * patches_per_step
    if hours is None and patches_per_s:
        hours = patches / patches_per_s / 3600
    price = usd_per_hour if usd_per_hour is not None else INSTANCES.get(instance_type, (None, None, None))[2]
    on_demand = hours * price * instance_count if hours is not None and price is not None else None
    volume_usd = (hours * volume_gb * instance_count * VOLUME_USD_PER_GB_MONTH / HOURS_PER_MONTH
                  if hours is not None else None)
    first_gets, first_bytes = (epoch_gets[0], epoch_bytes[0]) if epoch_gets else (0, 0)
    later = max(len(epoch_gets) - 1, 1)
    later_gets, later_bytes = sum(epoch_gets[1:]) / later, sum(epoch_bytes[1:]) / later
    fee = get_usd_per_1000 / 1000
    return Bill(steps=steps, patches=patches, patches_per_s=patches_per_s, rate_source=rate_source, hours=hours,
                instance_type=instance_type, instance_count=instance_count, on_demand_usd=on_demand,
                spot_usd=None if on_demand is None else on_demand * (1 - SPOT_SAVING), volume_gb=volume_gb,
                volume_usd=volume_usd, gets_first_epoch=int(first_gets), mib_first_epoch=first_bytes / 2**20,
                gets_later_epoch=later_gets, mib_later_epoch=later_bytes / 2**20, gets=int(sum(epoch_gets)),
                mib=sum(epoch_bytes) / 2**20, request_usd_first_epoch=first_gets * fee,
                request_usd_later_epoch=later_gets * fee, request_usd=sum(epoch_gets) * fee)


def bill_text(bill: Bill, what: str = "forecast") -> str:
    """The bill in a few lines (``what``: ``forecast`` or ``actual``)."""
    instances = f"{bill.instance_count} x {bill.instance_type}" if bill.instance_type else "this machine"
    if bill.hours is None:
        time = f"hours not forecast ({bill.rate_source})"
    else:
        rate = f"{bill.patches_per_s:.2f} patches/s" if bill.patches_per_s else "measured"
        time = f"{bill.hours:.2f} h at {rate}" + (f" ({bill.rate_source})" if bill.rate_source else "")
    lines = [f"bill ({what}): {bill.steps:,} steps, {bill.patches:,} patches on {instances}; {time}"]
    if bill.on_demand_usd is not None:
        lines.append(f"  instances: ${bill.on_demand_usd:,.2f} on demand, ${bill.spot_usd:,.2f} on spot "
                     f"(assumed {SPOT_SAVING:.0%} off); volume {bill.volume_gb} GB ${bill.volume_usd:,.2f}")
    elif bill.volume_gb:
        lines.append(f"  instances: no price in the table for {bill.instance_type}; volume {bill.volume_gb} GB")
    lines.append(f"  S3 reads: first epoch {bill.gets_first_epoch:,} GETs, {bill.mib_first_epoch:,.1f} MiB "
                 f"(${bill.request_usd_first_epoch:.4f}); later epochs {bill.gets_later_epoch:,.0f} GETs, "
                 f"{bill.mib_later_epoch:,.1f} MiB each (${bill.request_usd_later_epoch:.4f}); "
                 f"run {bill.gets:,} GETs, {bill.mib:,.1f} MiB, ${bill.request_usd:.4f}")
    return "\n".join(lines)


def comparison_text(forecast: dict, actual: dict) -> str:
    """A run's summary ``bill`` (:meth:`Bill.to_json` of the forecast and of what it cost) side by side."""
    def money(value, places: int = 2) -> str:
        return "-" if value is None else f"${value:,.{places}f}"

    def hours(value) -> str:
        return "-" if value is None else f"{value:.3g} h"

    rows = [("steps", "steps", "{:,}"), ("GETs", "gets", "{:,}"), ("MiB read", "mib", "{:,.1f}"),
            ("first epoch GETs", "gets_first_epoch", "{:,}"), ("later epoch GETs", "gets_later_epoch", "{:,.0f}")]
    lines = ["  bill: forecast / actual"]
    lines += [f"    {name}: {fmt.format(forecast[key])} / {fmt.format(actual[key])}" for name, key, fmt in rows]
    lines.append(f"    hours: {hours(forecast['hours'])} / {hours(actual['hours'])}; on demand: "
                 f"{money(forecast['on_demand_usd'])} / {money(actual['on_demand_usd'])}; requests: "
                 f"{money(forecast['request_usd'], 4)} / {money(actual['request_usd'], 4)}")
    return "\n".join(lines)
