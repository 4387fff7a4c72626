"""torch.distributed under torchrun: process group, device, and the few collectives training needs.

Without torchrun (``WORLD_SIZE`` unset or 1) every helper is a cheap no-op for a single process.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; returns ``(rank, world_size, device)``.

    NCCL on GPUs, gloo on CPU. Each rank uses the GPU of its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return rank(), world, device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over ranks."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def total(value: float, device: torch.device) -> float:
    """The sum of ``value`` over ranks."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast(value):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def cpu_threads() -> int:
    """Intra-op threads for training on the CPU: the cores this process may use (its share when
    torchrun starts several per host). The DataLoader workers only read (the local cache serves
    them from the second epoch) and the augmentation runs in this process, so the model gets every
    core: 15.0 vs 10.0 patches/s with 2 workers on 2 cores, and the same 5.7 patches/s while the
    first epoch fills the cache (``benchmarks/peer.py``'s settings)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // local)


def use_cpu_threads() -> int:
    """Set this process's intra-op threads to :func:`cpu_threads` and start them on a throwaway
    operation; returns the count.

    The first operation a process splits across threads has not always rounded alike: on this
    project's 2-core CI machine the second thread's half of the first augmentation's bias field
    (``exp`` over 32³ voxels) sometimes differed by up to 7e-5 relative, so a resumed run drifted
    from an uninterrupted one (tests/test_training.py's killed-run test: 11 of 74 resumes differed;
    with this warm-up 0 of 22). The cause was not found; this keeps the first split operation off
    the data.
    """
    threads = cpu_threads()
    torch.set_num_threads(threads)
    torch.ones(4 * 32768).exp_()  # more elements than one thread's grain (32768): split across threads
    return threads
