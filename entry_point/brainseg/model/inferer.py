"""Whole-volume inference: Gaussian-weighted sliding windows (MONAI), optionally averaged over
mirrored copies, under the run's autocast precision."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast when asked for, else a no-op context."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def sliding_window(network: torch.nn.Module, volume: np.ndarray, patch_size: tuple, overlap: float,
                   sw_batch_size: int, precision: str, device: torch.device,
                   flips: tuple = ((),)) -> torch.Tensor:
    """The network's output ``(C, D, H, W)`` (float32, CPU) over a volume ``(C_in, D, H, W)`` by
    Gaussian-weighted sliding windows, averaged over the mirrored copies ``flips`` (axes of the
    ``(N, C, D, H, W)`` batch; ``()`` is the volume as it is)."""
    batch = torch.from_numpy(np.ascontiguousarray(volume))[None].to(device)
    total = None
    with torch.no_grad(), autocast(device, precision):
        for axes in flips:
            flipped = torch.flip(batch, axes) if axes else batch
            output = sliding_window_inference(flipped, roi_size=patch_size, sw_batch_size=sw_batch_size,
                                              predictor=network, overlap=overlap, mode="gaussian")
            output = (torch.flip(output, axes) if axes else output)[0].float().cpu()
            total = output if total is None else total + output
    return total / len(flips)
