"""The one-shot symmetric-memory all-reduce on two GPUs sums exactly like NCCL, also when many
run back to back inside one CUDA graph (a decode step runs two per layer on one buffer)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

SIZES = [(1, 4096), (7, 4096), (256, 4096), (600, 4096)]  # 600 rows exceed the 4 MiB buffer: NCCL


def _run(rank: int, init: str, failures) -> None:
    from pagedserve.replicas.parallel.group import join_group, leave_group

    tp = join_group(init, rank, 2, torch.device("cuda", rank))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            tp.one_shot = None
            tp.use_one_shot_all_reduce(dtype)
            if tp.one_shot is None:
                failures.append(f"rank {rank}: one-shot all-reduce was not set up for {dtype}")
                continue
            for shape in SIZES:
                _check(tp, shape, dtype, rank, failures)
            _check_graph(tp, dtype, rank, failures)
    finally:
        leave_group(tp)


def _inputs(shape, dtype, rank, seed):
    g = torch.Generator(device="cuda").manual_seed(seed * 2 + rank)
    return torch.randn(shape, generator=g, device="cuda").to(dtype)


def _check(tp, shape, dtype, rank, failures) -> None:
    import torch.distributed as dist

    x = _inputs(shape, dtype, rank, seed=len(failures) + shape[0])
    expected = x.clone()
    dist.all_reduce(expected)
    got = tp.all_reduce(x.clone())
    if not torch.equal(got, expected):
        failures.append(f"rank {rank} {dtype} {shape}: max diff {(got - expected).abs().max()}")


def _check_graph(tp, dtype, rank, failures, chain: int = 64) -> None:
    """`chain` dependent all-reduces in one graph: a buffer reused too early would show."""
    import torch.distributed as dist

    x = _inputs((256, 4096), dtype, rank, seed=99) * 1e-3
    static = x.clone()

    def chained(t):
        for i in range(chain):
            t = tp.all_reduce(t * 0.5 + i)
        return t

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chained(static.clone())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chained(static)
    graph.replay()
    expected = x.clone()
    for i in range(chain):
        expected = expected * 0.5 + i
        dist.all_reduce(expected)
    torch.cuda.synchronize()
    if not torch.equal(out, expected):
        failures.append(f"rank {rank} {dtype} graph chain: max diff {(out - expected).abs().max()}")


def test_one_shot_equals_nccl_on_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from pagedserve.replicas.parallel import symmetric_all_reduce
    from pagedserve.replicas.parallel.rendezvous import rendezvous_address

    if not symmetric_all_reduce.available():
        pytest.skip("this torch has no symmetric-memory one-shot all-reduce")
    with mp.Manager() as manager:
        failures = manager.list()
        mp.spawn(_run, args=(rendezvous_address(), failures), nprocs=2)
        assert list(failures) == []
