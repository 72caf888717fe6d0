"""Run a function as both ranks of a two-process gloo group (spawned; for CPU unit tests)."""

from __future__ import annotations

import multiprocessing

import torch.distributed as dist

from pagedserve.replicas.parallel.rendezvous import rendezvous_address


def run_two_ranks(target, *args, timeout_s: float = 120.0) -> dict[int, object]:
    """{rank: target(rank, *args)} for ranks 0 and 1, each in its own process in one group.

    `target` must be importable (a module-level function); an exception in it comes back as
    the string "unexpected <error>".
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = rendezvous_address()
    procs = [ctx.Process(target=_rank_main, args=(r, init_method, target, args, results))
             for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _rank_main(rank: int, init_method: str, target, args, results) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        results.put((rank, target(rank, *args)))
    except Exception as err:
        results.put((rank, f"unexpected {err!r}"))
    finally:
        dist.destroy_process_group()
