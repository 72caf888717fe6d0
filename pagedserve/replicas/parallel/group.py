"""Joining a replica's tensor-parallel process group (torch.distributed; no Ray here).

The group's address comes from `rendezvous.rendezvous_address`, one per replica.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from pagedserve.replicas.parallel.layers import TensorParallel

# How long ranks wait for each other at the rendezvous and in a collective. A large model's
# first load (conversion, profiling, graph capture) happens between collectives.
GROUP_TIMEOUT_S = float(os.environ.get("PAGEDSERVE_TP_TIMEOUT_S", 1800))


def join_group(init_method: str, rank: int, size: int, device: torch.device) -> TensorParallel:
    """Join the group (NCCL on GPU, gloo on CPU) as `rank` of `size`; blocks until all joined."""
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timeout)
    return TensorParallel(rank, size, device)


def leave_group(tp: TensorParallel | None = None) -> None:
    """Leave the process group, after freeing what `tp` holds in it (symmetric buffers)."""
    if tp is not None:
        tp.release()
    if dist.is_initialized():
        dist.destroy_process_group()
