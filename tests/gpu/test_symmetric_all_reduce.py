"""The one-shot symmetric-memory all-reduce on two GPUs sums exactly like NCCL, also when many
run back to back inside one CUDA graph (a decode step runs two per layer on one buffer); the
fused all-reduce + residual add + RMSNorm agrees with NCCL then `add_norm`, in graphs too."""

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
                _check_add_norm(tp, shape, dtype, rank, failures)
            _check_graph(tp, dtype, rank, failures)
            _check_add_norm_graph(tp, dtype, rank, failures)
            _check_add_norm_one_rank_late(tp, dtype, rank, failures)
            _check_add_norm_signed_zeros(tp, dtype, rank, failures)
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


def _replayed(function, static: torch.Tensor, replays: int = 1):
    """`function(static)` captured in a CUDA graph (after a warm-up on a side stream), then
    replayed `replays` times; returns the graph's outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function(static.clone())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = function(static)
    for _ in range(replays):
        graph.replay()
    return out


def _check_graph(tp, dtype, rank, failures, chain: int = 64) -> None:
    """`chain` dependent all-reduces in one graph: a buffer reused too early would show."""
    import torch.distributed as dist

    x = _inputs((256, 4096), dtype, rank, seed=99) * 1e-3
    static = x.clone()

    def chained(t):
        for i in range(chain):
            t = tp.all_reduce(t * 0.5 + i)
        return t

    out = _replayed(chained, static)
    expected = x.clone()
    for i in range(chain):
        expected = expected * 0.5 + i
        dist.all_reduce(expected)
    torch.cuda.synchronize()
    if not torch.equal(out, expected):
        failures.append(f"rank {rank} {dtype} graph chain: max diff {(out - expected).abs().max()}")


def _norm(dtype):
    from pagedserve.replicas.models.layers import RMSNorm

    norm = RMSNorm(4096, 1e-5).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 4096))
    return norm


def _same_on_both_ranks(t: torch.Tensor) -> bool:
    import torch.distributed as dist

    other = t.clone()
    dist.broadcast(other, src=0)
    return torch.equal(t, other)


def _add_norm_tolerance(dtype) -> dict[str, float]:
    """The fused kernel against NCCL then `add_norm`: one rounding of the two-rank sum may
    differ in bf16."""
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05,
                                                                        "rtol": 0.02}


def _expect_add_norm(failures, tag, dtype, pairs) -> None:
    """Each (name, fused result, NCCL then `add_norm`) pair is close and identical on both
    ranks. The rank comparison is a collective, so every rank makes it for every pair."""
    tol = _add_norm_tolerance(dtype)
    for name, got, want in pairs:
        if not torch.allclose(got.float(), want.float(), **tol):
            failures.append(f"{tag} add_norm {name}: max diff {(got - want).abs().max()}")
        if not _same_on_both_ranks(got):
            failures.append(f"{tag} add_norm {name}: differs between ranks")


def _check_add_norm(tp, shape, dtype, rank, failures) -> None:
    """The fused all-reduce + residual add + RMSNorm against NCCL then `add_norm`: close (one
    rounding of the two-rank sum may differ in bf16), and identical on both ranks."""
    import torch.distributed as dist

    norm = _norm(dtype)
    x = _inputs(shape, dtype, rank, seed=7 + shape[0])
    for residual in (None, _inputs(shape, dtype, 0, seed=11)):
        summed = x.clone()
        dist.all_reduce(summed)
        want_out, want_res = norm.add_norm(summed, residual)
        got_out, got_res = tp.sum_add_norm(x.clone(), residual, norm)
        _expect_add_norm(failures, f"rank {rank} {dtype} {shape} residual={residual is not None}",
                         dtype, (("out", got_out, want_out), ("residual", got_res, want_res)))


def _check_add_norm_graph(tp, dtype, rank, failures, chain: int = 64) -> None:
    """`chain` dependent fused calls in one CUDA graph equal the same calls run eagerly."""
    norm = _norm(dtype)
    x = _inputs((128, 4096), dtype, rank, seed=5)

    def chained(t):
        residual = None
        for _ in range(chain):
            t, residual = tp.sum_add_norm(t, residual, norm)
        return t, residual

    eager = chained(x.clone())
    static = x.clone()
    out = _replayed(chained, static, replays=3)  # back to back: buffers and flags reused
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "residual"), out, eager, strict=True):
        if not torch.equal(got, want):
            failures.append(f"rank {rank} {dtype} add_norm graph chain {name}: "
                            f"max diff {(got - want).abs().max()}")


def _check_add_norm_one_rank_late(tp, dtype, rank, failures) -> None:
    """Back-to-back fused calls of changing row counts (past 128 rows a program takes several),
    each rank in turn held back
    before a call so that the other runs ahead into the next: every result equals NCCL then
    `add_norm`."""
    import torch.distributed as dist

    norm = _norm(dtype)
    shapes = [(rows, 4096) for rows in (1, 200, 7, 128, 3, 256) * 3]
    inputs = [_inputs(shape, dtype, rank, seed=20 + i) for i, shape in enumerate(shapes)]
    torch.cuda.synchronize()
    got = []
    for i, x in enumerate(inputs):
        if i % 2 == rank:
            torch.cuda._sleep(200_000)  # about 0.1 ms of this rank's stream
        got.append(tp.sum_add_norm(x, None, norm)[0])
    for i, (x, out) in enumerate(zip(inputs, got, strict=True)):
        summed = x.clone()
        dist.all_reduce(summed)
        want, _ = norm.add_norm(summed, None)
        _expect_add_norm(failures, f"rank {rank} {dtype} call {i} ({shapes[i][0]} rows, one "
                         "rank late)", dtype, (("out", out, want),))


def _check_add_norm_signed_zeros(tp, dtype, rank, failures) -> None:
    """Negative zeros (the fused kernel's empty mark) in the inputs: rows of them, scattered
    ones, and sums that cancel to zero, twice over so each inbox half sees them. Nothing hangs,
    results equal NCCL then `add_norm` and are identical on both ranks."""
    import torch.distributed as dist

    norm = _norm(dtype)
    for call in range(4):
        x = _inputs((9, 4096), dtype, rank, seed=40 + call)
        x[0] = -0.0
        x[1, ::3] = -0.0
        x[2, ::5] = 0.0
        base = _inputs((1, 4096), dtype, 0, seed=50)[0]
        x[3] = base if rank == 0 else -base  # the two parts cancel: the sum is zero
        summed = x.clone()
        dist.all_reduce(summed)
        want, want_res = norm.add_norm(summed, None)
        out, res = tp.sum_add_norm(x, None, norm)
        _expect_add_norm(failures, f"rank {rank} {dtype} signed zeros call {call}", dtype,
                         (("out", out, want), ("residual", res, want_res)))


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
