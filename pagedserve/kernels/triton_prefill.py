"""Triton paged prefill attention: causal, packed variable-length queries, paged context.

Each program takes BLOCK_M query rows of one sequence and one head and streams that sequence's
keys and values through its block table, cached prefix included, with a running softmax.

The grid is sized from shapes alone: sequence i's query tiles are numbered from
`query_start_loc[i] // BLOCK_M + i`, which leaves room for all of its `ceil(q_len / BLOCK_M)`
tiles, so `num_tokens // BLOCK_M + num_seqs` programs cover every tile. A program finds its
sequence by binary search over `query_start_loc`; programs past their sequence's last tile
return at once. No host sync is needed to learn the longest query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton_checks import check_attention_args, check_index, dot_precision

BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # context tokens per tile
LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_M: tl.constexpr):
    """The last sequence whose first tile number is <= `tile`."""
    lo = tl.zeros([], tl.int32)
    hi = num_seqs + lo
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_M + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Not specialized, so no variant is compiled mid-run: the sequence count and the block table's
# width change from step to step, and in a mixed step the tables and lengths are slices that
# start after the decode rows, so their addresses need not be 16-byte aligned.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "block_tables_ptr", "context_lens_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr,
    out_ptr, scale_log2, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    local_tile = tile - (q_start // BLOCK_M + seq)
    if local_tile * BLOCK_M >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    prefix = context_len - q_len  # the new tokens are the last q_len of the context

    rows = local_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    positions = prefix + rows
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)

    kv_head = head // GROUP
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    row_size = NUM_KV_HEADS * HEAD_DIM
    # Causality: no key past this tile's last query position is needed.
    kv_end = tl.minimum(context_len, prefix + (local_tile + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: keeps exp2(m_old - m_new) defined
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile_start in range(0, kv_end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        valid = tokens < kv_end
        block = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_rows = (block * BLOCK_SIZE + tokens % BLOCK_SIZE) * row_size + kv_head * HEAD_DIM
        k = tl.load(k_cache_ptr + kv_rows[:, None] + dims[None, :], mask=valid[:, None],
                    other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = valid[None, :] & (tokens[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_rows[:, None] + dims[None, :], mask=valid[:, None],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for packed variable-length queries over their paged context.

    Same contract as `attention_ref.paged_prefill_attention`: query `[T, heads, head_dim]`,
    sequence i owns rows `query_start_loc[i]:query_start_loc[i+1]`, which are the last tokens of
    its `context_lens[i]`; their K/V must already be stored. head_dim 64 or 128, fp16/bf16/fp32.
    """
    block_size, num_kv_heads, num_heads, head_dim, group = check_attention_args(
        query, k_cache, v_cache)
    device = k_cache.device
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [batch, max_blocks], got {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    check_index("block_tables", block_tables, tuple(block_tables.shape), device)
    check_index("query_start_loc", query_start_loc, (num_seqs + 1,), device)
    check_index("context_lens", context_lens, (num_seqs,), device)
    out = torch.empty(query.shape, dtype=query.dtype, device=device)
    num_tokens = query.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (num_tokens // BLOCK_M + num_seqs, num_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * LOG2E, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4, num_stages=2,
    )
    return out
