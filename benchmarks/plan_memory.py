"""``--plan auto``'s memory estimate against a measured training step.

    python benchmarks/plan_memory.py [--out benchmarks/results/plan_memory.json]

For each network and patch below, in fp32 and bf16, a process of its own builds the network
(four input sequences, three BraTS regions), AdamW and a batch of 2, then takes one training step
(forward under autocast, a BCE loss, backward, optimiser step: the step's activations,
gradients and Adam moments all live at its peak). Measured: on a GPU, the CUDA allocator's peak
over the step less what was allocated before it; on the CPU, the process's peak resident memory
(``ru_maxrss``) over the step less its peak before it. Compared with what ``estimate_gb`` prices
the same step at, less what was already there before it (the weights, 4 bytes a parameter) and
the 1 GiB it adds for the CUDA context and cuDNN workspaces (outside the allocator, not measured):
activations x bytes per activation + 12 bytes a parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "entry_point"))

CASES = (  # (channels, patch)
    ((16, 32, 64, 128, 256), (64, 64, 64)),
    ((16, 32, 64, 128, 256), (96, 96, 96)),
    ((16, 32, 64, 128, 256), (128, 128, 128)),
    ((32, 64, 128, 256, 320), (96, 96, 96)),
)
PRECISIONS = ("fp32", "bf16")
BATCH, SEQUENCES, REGIONS = 2, 4, 3


def step(channels: tuple, patch: tuple, precision: str) -> dict:
    """One training step in this process; its measured peak and the plan's estimate of it."""
    import resource

    import torch

    from brainseg.model.networks import NetworkSpec, build_model
    from brainseg.run.plan import CONTEXT_GB, activations_per_voxel, estimate_gb

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    spec = NetworkSpec(channels=channels, in_channels=SEQUENCES, out_channels=REGIONS)
    model = build_model(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image = torch.randn(BATCH, SEQUENCES, *patch, device=device)
    target = (torch.rand(BATCH, REGIONS, *patch, device=device) > 0.9).float()
    parameters = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image).float(), target)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time.perf_counter() - started
    activations = activations_per_voxel(spec) * BATCH * (patch[0] * patch[1] * patch[2])
    # the plan's figure less the CUDA context and the weights, which were there before the step
    estimated = (estimate_gb(spec, patch, BATCH, precision) - CONTEXT_GB) * 1e9 - 4 * parameters
    return {"channels": list(channels), "patch": list(patch), "precision": precision, "batch_size": BATCH,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "parameters": parameters,
            "activations": round(activations), "estimated_gb": round(estimated / 1e9, 3),
            "measured_gb": round(peak / 1e9, 3), "estimate_over_measured": round(estimated / peak, 3),
            "measured_bytes_per_activation": round((peak - 12 * parameters) / activations, 2),
            "step_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan_memory.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: 'channels;patch;precision'
    args = parser.parse_args(argv)
    if args.one:
        channels, patch, precision = args.one.split(";")
        print(json.dumps(step(tuple(map(int, channels.split(","))), tuple(map(int, patch.split(","))), precision)))
        return 0
    rows = []
    for channels, patch in CASES:
        for precision in PRECISIONS:
            one = f"{','.join(map(str, channels))};{','.join(map(str, patch))};{precision}"
            child = subprocess.run([sys.executable, __file__, "--one", one], capture_output=True, text=True)
            if child.returncode != 0:
                raise RuntimeError(f"{one} failed:\n{child.stderr[-3000:]}")
            row = json.loads(child.stdout.splitlines()[-1])
            rows.append(row)
            print(f"{row['device']}: channels {row['channels']}, patch {row['patch']}, {precision}: estimated "
                  f"{row['estimated_gb']:.2f} GB, measured {row['measured_gb']:.2f} GB "
                  f"(x{row['estimate_over_measured']:.2f}; {row['measured_bytes_per_activation']:.2f} bytes per "
                  f"activation measured, {row['step_seconds']} s)", flush=True)
    ratios = [row["estimate_over_measured"] for row in rows]
    report = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "rows": rows, "estimate_over_measured": {"min": min(ratios), "max": max(ratios)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"estimate / measured: {min(ratios):.2f} to {max(ratios):.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
