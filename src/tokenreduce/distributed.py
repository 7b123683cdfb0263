"""The process group of a ``torchrun`` launch: one place that starts it and says who this process is."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> tuple[int, int]:
    """Initialise torch.distributed when launched by ``torchrun`` (``WORLD_SIZE`` > 1; NCCL with CUDA,
    else gloo); returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(shutdown_distributed)
    return rank_world()


def shutdown_distributed(wait: bool = False) -> None:
    """Tear the process group down (a no-op without one); with ``wait``, first meet every rank at a barrier.

    A gloo group left alive at interpreter exit can abort its process ("terminate called without an
    active exception") while its background threads are destroyed. ``wait=True`` is for a run that ended
    normally on every rank, so that no rank leaves while a peer still talks to it; after an error the
    other ranks may be inside a different collective, so the group is destroyed without waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()
