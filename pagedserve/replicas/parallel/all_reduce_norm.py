"""All-reduce fused with the residual add and RMSNorm that follow it, through symmetric memory.

Under tensor parallelism every row-parallel product (attention's o_proj, the MLP's down_proj)
is summed over the ranks and then, in the next op, added to the residual stream and normed.
This kernel does both in one launch: each program copies its rows of this rank's partial sum
into this rank's symmetric buffer, meets the same program on every peer (a flag per program
and rank pair in a symmetric signal pad), reads every rank's rows over NVLink, sums them in
rank order (so every rank gets the same values), adds the residual and norms, then meets its
peers again so that no rank overwrites its buffer while a peer still reads it. The grid is
at most `MAX_PROGRAMS`, few enough to be resident at once, so a meeting never waits on a
program that has not started.

The sum is rounded to the tensor's dtype before the residual add, as an all-reduce followed
by `add_rms_norm` would store it (`fused_ops._round`).
"""

from __future__ import annotations

import torch

from pagedserve.replicas.models.fused_ops import _rounding

try:
    import triton
    import triton.language as tl

    from pagedserve.replicas.models.fused_ops import _round
except ImportError:
    triton = None

# Programs wait for their peers, so all must be resident at once: 128 is below an H100/H200's
# 132 SMs, and a program (8 warps, no shared memory) leaves room for others on an SM.
MAX_PROGRAMS = 128


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None,
                            weight: torch.Tensor, eps: float, buffer_ptrs: torch.Tensor,
                            signal_ptrs: torch.Tensor, rank: int, world: int):
    """(RMSNorm(sum over ranks of x + residual) * weight, that sum + residual) for [rows, hidden]
    `x` (contiguous); every rank calls it at the same point with its own partial `x`.

    `buffer_ptrs`: each rank's symmetric buffer (device int64 addresses, at least x's size);
    `signal_ptrs`: each rank's signal pad (int32, zeroed, `MAX_PROGRAMS * world` flags).
    """
    rows, hidden = x.shape
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    if rows:
        _all_reduce_add_rms_norm_kernel[(min(rows, MAX_PROGRAMS),)](
            x, residual if residual is not None else x, res_out, weight, out, buffer_ptrs,
            signal_ptrs, rows, hidden, eps, rank, HAS_RESIDUAL=residual is not None,
            WORLD=world, BLOCK=triton.next_power_of_2(hidden), ROUND=_rounding(x.dtype),
            num_warps=8 if hidden >= 2048 else 4,
        )
    return out, res_out


if triton is not None:

    @triton.jit
    def _meet_peers(signal_ptrs, slot, rank, WORLD: tl.constexpr):
        """Every program `slot` of every rank waits here until all have arrived.

        Arriving sets this rank's flag on each peer (0 -> 1, release: this program's earlier
        stores are visible first); leaving clears each peer's flag here (1 -> 0, acquire). A
        flag is set again only after its peer cleared it, so the pads need no reset.
        """
        tl.debug_barrier()
        for peer in tl.static_range(WORLD):
            if peer != rank:
                flag = tl.load(signal_ptrs + peer).to(tl.pointer_type(tl.int32)) + slot * WORLD + rank
                seen = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
                while seen != 0:
                    seen = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
        mine = tl.load(signal_ptrs + rank).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != rank:
                seen = tl.atomic_cas(mine + slot * WORLD + peer, 1, 0, sem="acquire", scope="sys")
                while seen != 1:
                    seen = tl.atomic_cas(mine + slot * WORLD + peer, 1, 0, sem="acquire",
                                         scope="sys")
        tl.debug_barrier()

    @triton.jit
    def _all_reduce_add_rms_norm_kernel(
            x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, buffer_ptrs, signal_ptrs, rows,
            hidden, eps, rank, HAS_RESIDUAL: tl.constexpr, WORLD: tl.constexpr,
            BLOCK: tl.constexpr, ROUND: tl.constexpr):
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        elem = x_ptr.dtype.element_ty
        mine = tl.multiple_of(tl.load(buffer_ptrs + rank).to(tl.pointer_type(elem)), 16)
        for row in range(program, rows, programs):
            offs = row.to(tl.int64) * hidden + cols
            tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
        _meet_peers(signal_ptrs, program, rank, WORLD)
        for row in range(program, rows, programs):
            offs = row.to(tl.int64) * hidden + cols
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):  # rank order on every rank: identical sums
                part = tl.multiple_of(tl.load(buffer_ptrs + r).to(tl.pointer_type(elem)), 16)
                total += tl.load(part + offs, mask=mask, other=0.0,
                                 cache_modifier=".cv").to(tl.float32)
            x32 = _round(total, ROUND)  # as the all-reduce would store it
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + offs, mask=mask, other=0.0)
                x32 = _round(x32 + r.to(tl.float32), ROUND)
            tl.store(res_out_ptr + offs, x32.to(elem), mask=mask)
            rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
            normed = _round(x32 * rstd, ROUND)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (normed * w).to(elem), mask=mask)
        _meet_peers(signal_ptrs, program, rank, WORLD)
