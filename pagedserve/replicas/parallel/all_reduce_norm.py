"""All-reduce fused with the residual add and RMSNorm that follow it, through symmetric memory.

Under tensor parallelism every row-parallel product (attention's o_proj, the MLP's down_proj)
is summed over the ranks and then, in the next op, added to the residual stream and normed.
This kernel does both in one launch, writing rather than reading over NVLink (a remote store
is posted; a remote load waits a round trip):

1. each program stores its rows of this rank's partial sum into every peer's inbox, in the
   half of the inbox that this call's parity picks and the part kept for this rank;
2. it then adds one to this rank's arrival count on each peer (release: the rows are visible
   first) and waits until each peer's count here has reached this call's number (acquire);
3. it sums the ranks' rows in rank order (its own from `x`, the peers' from its local inbox),
   so every rank gets the same values, adds the residual and norms.

Each program keeps its own call count (in the signal pad), the same on every rank since every
rank makes the same calls. Two inbox halves make a second meeting unneeded: a peer can be at
most one call ahead (its next call waits for this rank's arrival), so it writes the other
half while this rank still reads. The grid is at most `MAX_PROGRAMS`, few enough to be
resident at once, so a program never waits on a peer program that has not started.

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
# 132 SMs, and a program (8 warps, little shared memory) leaves room for others on an SM.
MAX_PROGRAMS = 128


def inbox_elements(max_elements: int, world: int) -> int:
    """Inbox size (elements) for inputs of up to `max_elements`: two halves, a part per rank."""
    return 2 * world * max_elements


def signal_pad_elements(world: int) -> int:
    """Signal pad size (int32): an arrival count per program and rank, then a call count per
    program."""
    return MAX_PROGRAMS * (world + 1)


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None,
                            weight: torch.Tensor, eps: float, inbox_ptrs: torch.Tensor,
                            max_elements: int, signal_ptrs: torch.Tensor, rank: int, world: int):
    """(RMSNorm(sum over ranks of x + residual) * weight, that sum + residual) for [rows, hidden]
    `x` (contiguous, at most `max_elements`); every rank calls it at the same point with its own
    partial `x`.

    `inbox_ptrs`: each rank's symmetric inbox (device int64 addresses, `inbox_elements`);
    `signal_ptrs`: each rank's signal pad (int32, zeroed before first use,
    `signal_pad_elements`).
    """
    rows, hidden = x.shape
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    assert x.numel() <= max_elements
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    if rows:
        _all_reduce_add_rms_norm_kernel[(min(rows, MAX_PROGRAMS),)](
            x, residual if residual is not None else x, res_out, weight, out, inbox_ptrs,
            max_elements, signal_ptrs, rows, hidden, eps, rank,
            HAS_RESIDUAL=residual is not None, WORLD=world,
            BLOCK=triton.next_power_of_2(hidden), ROUND=_rounding(x.dtype),
            MAX_PROGRAMS=MAX_PROGRAMS, num_warps=8 if hidden >= 2048 else 4,
        )
    return out, res_out


if triton is not None:

    @triton.jit
    def _pointer(ptrs, rank, elem: tl.constexpr):
        return tl.multiple_of(tl.load(ptrs + rank).to(tl.pointer_type(elem)), 16)

    @triton.jit
    def _arrive_and_wait(signal_ptrs, program, rank, calls, WORLD: tl.constexpr):
        """Count this call's arrival on every peer; wait for every peer's arrival here.

        Counts only grow (wrapping at 2**32); a peer's count here is `calls - 1` until it
        arrives and can be one ahead after, never further, hence the inequality test.
        """
        tl.debug_barrier()  # every thread's rows are stored before the arrival is released
        for peer in tl.static_range(WORLD):
            if peer != rank:
                pad = tl.load(signal_ptrs + peer).to(tl.pointer_type(tl.int32))
                tl.atomic_add(pad + program * WORLD + rank, 1, sem="release", scope="sys")
        mine = tl.load(signal_ptrs + rank).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != rank:
                seen = tl.atomic_add(mine + program * WORLD + peer, 0, sem="acquire", scope="sys")
                while seen == calls - 1:
                    seen = tl.atomic_add(mine + program * WORLD + peer, 0, sem="acquire",
                                         scope="sys")
        tl.debug_barrier()

    @triton.jit
    def _all_reduce_add_rms_norm_kernel(
            x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, inbox_ptrs, max_elements, signal_ptrs,
            rows, hidden, eps, rank, HAS_RESIDUAL: tl.constexpr, WORLD: tl.constexpr,
            BLOCK: tl.constexpr, ROUND: tl.constexpr, MAX_PROGRAMS: tl.constexpr):
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        elem = x_ptr.dtype.element_ty
        counter = tl.load(signal_ptrs + rank).to(tl.pointer_type(tl.int32))
        counter += MAX_PROGRAMS * WORLD + program
        calls = tl.load(counter, volatile=True) + 1
        half = (calls & 1).to(tl.int64) * WORLD * max_elements
        for row in range(program, rows, programs):  # 1. this rank's rows into each peer's inbox
            offs = row.to(tl.int64) * hidden + cols
            part = tl.load(x_ptr + offs, mask=mask)
            for peer in tl.static_range(WORLD):
                if peer != rank:
                    inbox = _pointer(inbox_ptrs, peer, elem) + half + rank * max_elements
                    tl.store(inbox + offs, part, mask=mask)
        _arrive_and_wait(signal_ptrs, program, rank, calls, WORLD)  # 2.
        inbox = _pointer(inbox_ptrs, rank, elem) + half
        for row in range(program, rows, programs):  # 3.
            offs = row.to(tl.int64) * hidden + cols
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):  # rank order on every rank: identical sums
                if r == rank:
                    part = tl.load(x_ptr + offs, mask=mask, other=0.0)
                else:
                    part = tl.load(inbox + r * max_elements + offs, mask=mask, other=0.0,
                                   cache_modifier=".cv")
                total += part.to(tl.float32)
            x32 = _round(total, ROUND)  # as the all-reduce would store it
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + offs, mask=mask, other=0.0)
                x32 = _round(x32 + r.to(tl.float32), ROUND)
            tl.store(res_out_ptr + offs, x32.to(elem), mask=mask)
            rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
            normed = _round(x32 * rstd, ROUND)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (normed * w).to(elem), mask=mask)
        tl.store(counter, calls)
