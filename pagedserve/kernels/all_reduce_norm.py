"""All-reduce fused with the residual add and RMSNorm that follow it, through symmetric memory.

Under tensor parallelism every row-parallel product (attention's o_proj, the MLP's down_proj)
is summed over the ranks and then, in the next op, added to the residual stream and normed.
This kernel does both in one launch, writing rather than reading over NVLink (a remote store
is posted; a remote load waits a round trip), and with no flag: the rows are their own signal.

1. Each program stores its rows of this rank's partial sum into every peer's inbox, in the
   half of the inbox that this call's parity picks and the part kept for this rank.
2. For each of its rows it reads the peers' parts from its own inbox until no element holds
   the sentinel (negative zero; senders turn their negative zeros into positive ones, which
   changes no sum), then puts the sentinel back for the call after next.
3. It sums the ranks' rows in rank order, so every rank gets the same values, adds the
   residual and norms.

Every element is written once a call and checked where it is read, so no fence or arrival
count is needed: the sender never waits for its stores to be acknowledged. Two halves
suffice: a peer writes this half again two calls later, after this rank's next call has sent
it rows, which comes after this call (and its resets) ended.

The grid is always `MAX_PROGRAMS` and row `i` belongs to program `i % MAX_PROGRAMS` in every
call, so each program's call count (the parity) is the same in all programs and on all ranks,
and a program never waits on a peer program that is not resident.

The sum is rounded to the tensor's dtype before the residual add, as an all-reduce followed
by `add_rms_norm` would store it (`fused_ops._round`).
"""

from __future__ import annotations

import torch

from pagedserve.kernels.fused_ops import _rounding

try:
    import triton
    import triton.language as tl

    from pagedserve.kernels.fused_ops import _round
except ImportError:
    triton = None

# Programs wait for their peers, so all must be resident at once: 128 is below an H100/H200's
# 132 SMs, and a program (8 warps, little shared memory) leaves room for others on an SM.
MAX_PROGRAMS = 128

# The sentinel's bits as a signed integer of the element's width (negative zero).
_SENTINEL_BITS = {2: -(2**15), 4: -(2**31)}
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32}


def inbox_elements(max_elements: int, world: int) -> int:
    """Inbox size (elements) for inputs of up to `max_elements`: two halves, a part per rank."""
    return 2 * world * max_elements


def fill_with_sentinel(inbox: torch.Tensor) -> None:
    """Mark every inbox element empty (before first use, on every rank)."""
    width = inbox.element_size()
    inbox.view(_INT_OF_WIDTH[width]).fill_(_SENTINEL_BITS[width])


def new_call_counts(device: torch.device) -> torch.Tensor:
    """Each program's call count (int32, this rank only)."""
    return torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None,
                            weight: torch.Tensor, eps: float, inbox_ptrs: torch.Tensor,
                            max_elements: int, call_counts: torch.Tensor, rank: int, world: int):
    """(RMSNorm(sum over ranks of x + residual) * weight, that sum + residual) for [rows, hidden]
    `x` (contiguous, at most `max_elements`); every rank calls it at the same point with its own
    partial `x`.

    `inbox_ptrs`: each rank's symmetric inbox (device int64 addresses, `inbox_elements`, filled
    by `fill_with_sentinel`); `call_counts`: `new_call_counts`.
    """
    rows, hidden = x.shape
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    assert x.numel() <= max_elements and x.element_size() in _SENTINEL_BITS
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    _all_reduce_add_rms_norm_kernel[(MAX_PROGRAMS,)](
        x, residual if residual is not None else x, res_out, weight, out, inbox_ptrs,
        max_elements, call_counts, rows, hidden, eps, rank,
        HAS_RESIDUAL=residual is not None, WORLD=world, BLOCK=triton.next_power_of_2(hidden),
        ROUND=_rounding(x.dtype), SENTINEL=_SENTINEL_BITS[x.element_size()],
        num_warps=8 if hidden >= 2048 else 4,
    )
    return out, res_out


if triton is not None:

    @triton.jit
    def _pointer(ptrs, rank, elem: tl.constexpr):
        return tl.multiple_of(tl.load(ptrs + rank).to(tl.pointer_type(elem)), 16)

    @triton.jit
    def _bits(values, SENTINEL: tl.constexpr):
        """`values` as signed integers of their width (the sentinel's type)."""
        if SENTINEL == -32768:
            return values.to(tl.int16, bitcast=True)
        else:
            return values.to(tl.int32, bitcast=True)

    @triton.jit
    def _sentinel_like(values, SENTINEL: tl.constexpr):
        if SENTINEL == -32768:
            return tl.full(values.shape, SENTINEL, tl.int16).to(values.dtype, bitcast=True)
        else:
            return tl.full(values.shape, SENTINEL, tl.int32).to(values.dtype, bitcast=True)

    @triton.jit
    def _without_negative_zero(values):
        return tl.where(values == 0.0, tl.zeros_like(values), values)

    @triton.jit
    def _receive(row_ptr, mask, SENTINEL: tl.constexpr):
        """A peer's row from this rank's inbox once all of it arrived; leaves the sentinel."""
        part = tl.load(row_ptr, mask=mask, other=0.0, volatile=True)
        pending = tl.sum((_bits(part, SENTINEL) == SENTINEL).to(tl.int32), axis=0)
        while pending > 0:
            part = tl.load(row_ptr, mask=mask, other=0.0, volatile=True)
            pending = tl.sum((_bits(part, SENTINEL) == SENTINEL).to(tl.int32), axis=0)
        tl.store(row_ptr, _sentinel_like(part, SENTINEL), mask=mask)
        return part

    # `rows` is the step's token count: not specialized, so no step compiles a new variant.
    @triton.jit(do_not_specialize=["rows"])
    def _all_reduce_add_rms_norm_kernel(
            x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, inbox_ptrs, max_elements,
            call_counts_ptr, rows, hidden, eps, rank, HAS_RESIDUAL: tl.constexpr,
            WORLD: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr,
            SENTINEL: tl.constexpr):
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        elem = x_ptr.dtype.element_ty
        calls = tl.load(call_counts_ptr + program) + 1
        half = (calls & 1).to(tl.int64) * WORLD * max_elements
        for row in range(program, rows, programs):  # 1. this rank's rows into each peer's inbox
            offs = row.to(tl.int64) * hidden + cols
            part = _without_negative_zero(tl.load(x_ptr + offs, mask=mask))
            for peer in tl.static_range(WORLD):
                if peer != rank:
                    inbox = _pointer(inbox_ptrs, peer, elem) + half + rank * max_elements
                    tl.store(inbox + offs, part, mask=mask)
        inbox = _pointer(inbox_ptrs, rank, elem) + half
        for row in range(program, rows, programs):  # 2. and 3.
            offs = row.to(tl.int64) * hidden + cols
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):  # rank order on every rank: identical sums
                if r == rank:
                    part = _without_negative_zero(tl.load(x_ptr + offs, mask=mask, other=0.0))
                else:
                    part = _receive(inbox + r * max_elements + offs, mask, SENTINEL)
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
        tl.store(call_counts_ptr + program, calls)
