"""Joining a replica's tensor-parallel process group (torch.distributed; no Ray here).

The group's address comes from `rendezvous.rendezvous_address`, one per replica. Rank 0 hosts
the group's store there and waits for every other rank to check in before the group forms;
while it waits it asks `rank_failure` (when given) whether a rank has died, so a rank that
fails at start is an error within a second, not a wait for the whole group timeout.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from pagedserve.replicas.parallel.layers import TensorParallel

# How long ranks wait for each other at the rendezvous and in a collective. A large model's
# first load (conversion, profiling, graph capture) happens between collectives.
GROUP_TIMEOUT_S = float(os.environ.get("PAGEDSERVE_TP_TIMEOUT_S", 1800))
POLL_S = 0.2  # rank 0 checks this often whether the others joined, or one died
_ARRIVED = "pagedserve/arrived/"


class RankStartError(RuntimeError):
    """A tensor-parallel rank died (or never came) before the group formed."""


def join_group(init_method: str, rank: int, size: int, device: torch.device,
               rank_failure: Callable[[], str | None] | None = None) -> TensorParallel:
    """Join the group (NCCL on GPU, gloo on CPU) as `rank` of `size`; blocks until all joined.

    `rank_failure` (rank 0 only): returns a description of a rank that died, else None.
    """
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    store = _check_in(init_method, rank, size, rank_failure)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return TensorParallel(rank, size, device)


def leave_group(tp: TensorParallel | None = None) -> None:
    """Leave the process group, after freeing what `tp` holds in it (symmetric buffers)."""
    if tp is not None:
        tp.release()
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_in(init_method: str, rank: int, size: int,
              rank_failure: Callable[[], str | None] | None) -> dist.TCPStore:
    """The group's store: rank 0 hosts it and returns once every rank checked in."""
    address = urlsplit(init_method)
    if address.scheme != "tcp" or not address.hostname or not address.port:
        raise ValueError(f"a tensor-parallel group address must be tcp://host:port, "
                         f"got {init_method!r}")
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    if rank > 0:
        store = dist.TCPStore(address.hostname, address.port, size, is_master=False,
                              timeout=timeout)
        store.set(f"{_ARRIVED}{rank}", "1")
        return store
    store = dist.TCPStore(address.hostname, address.port, size, is_master=True, timeout=timeout,
                          wait_for_workers=False)
    waiting = [f"{_ARRIVED}{r}" for r in range(1, size)]
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not store.check(waiting):
        if rank_failure is not None and (failure := rank_failure()) is not None:
            raise RankStartError(failure)
        if time.monotonic() > deadline:
            raise RankStartError(f"the other tensor-parallel ranks did not join within "
                                 f"{GROUP_TIMEOUT_S:.0f} s (PAGEDSERVE_TP_TIMEOUT_S)")
        time.sleep(POLL_S)
    return store
