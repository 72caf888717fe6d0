"""Triton paged decode attention: one query per sequence, split along the context.

Grid `(batch, kv_heads, splits)`. Each program loads a tile of its sequence's K/V once and uses
it for every query head of the kv head's group (GQA), keeping a running softmax (max, sum,
weighted values) in float32. With more than one split each program covers a fixed slice of
the context and writes partial results that a second kernel merges (flash-decoding), so a few
long sequences still occupy every multiprocessor.

CUDA-graph safe: the grid, the split count and all compile-time sizes come from tensor shapes
and the device's multiprocessor count, never from tensor values; rows whose context length is
0 (padding) read nothing and produce zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton_checks import check_attention_args, check_index, dot_precision

BLOCK_N = 64  # context tokens per tile
MAX_SPLITS = 64
SPLIT_CHUNK = 16  # splits the merge kernel reads at a time: one compiled variant for any count
MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more in merging than it gains
PROGRAMS_PER_MULTIPROCESSOR = 4
LOG2E = 1.4426950408889634


# Integers that change from step to step are not specialized: Triton would otherwise compile a
# variant per divisibility class (1, multiple of 16, other), mid-run. `stride_bt` is the block
# table's width, which eager steps size to their longest sequence; `num_splits` follows the
# batch. (`tokens_per_split` is always a multiple of BLOCK_N, so its class never changes.)
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2, stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
    tokens_per_split, num_splits,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    group = tl.arange(0, GROUP_P2)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None], other=0.0)

    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    start = split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)
    table = block_tables_ptr + seq * stride_bt
    row_size = NUM_KV_HEADS * HEAD_DIM
    # A finite floor instead of -inf keeps alpha = exp2(m_old - m_new) defined for empty rows.
    m_i = tl.full([GROUP_P2], -1.0e30, tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        valid = tokens < end
        block = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = (block * BLOCK_SIZE + tokens % BLOCK_SIZE) * row_size + kv_head * HEAD_DIM
        k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if not IS_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        part = (seq * NUM_HEADS + heads) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=head_ok[:, None])
        tl.store(part_m_ptr + part, m_i, mask=head_ok)
        tl.store(part_l_ptr + part, l_i, mask=head_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_ob, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    # Splits are read SPLIT_CHUNK at a time (a power-of-two block of the count would be a
    # compile-time size, and so a new variant for each count an eager step picks).
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    first = (seq * NUM_HEADS + head) * num_splits
    m_max = tl.full([SPLIT_CHUNK], -1.0e30, tl.float32)
    for start in range(0, num_splits, SPLIT_CHUNK):
        splits = start + tl.arange(0, SPLIT_CHUNK)
        m = tl.load(part_m_ptr + first + splits, mask=splits < num_splits, other=-1.0e30)
        m_max = tl.maximum(m_max, m)
    top = tl.max(m_max, 0)
    total = tl.zeros([SPLIT_CHUNK], tl.float32)
    acc = tl.zeros([SPLIT_CHUNK, HEAD_DIM], tl.float32)
    for start in range(0, num_splits, SPLIT_CHUNK):
        splits = start + tl.arange(0, SPLIT_CHUNK)
        split_ok = splits < num_splits
        part = first + splits
        m = tl.load(part_m_ptr + part, mask=split_ok, other=-1.0e30)
        l_split = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
        part_acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                           mask=split_ok[:, None], other=0.0)
        weight = tl.exp2(m - top)  # empty splits carry l = 0 and acc = 0
        total += l_split * weight
        acc += part_acc * weight[:, None]
    total_sum = tl.sum(total, 0)
    out = tl.sum(acc, 0) / tl.where(total_sum == 0.0, 1.0, total_sum)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's CPU interpreter: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, multiprocessors: int) -> int:
    """Split while batch * kv_heads leaves multiprocessors short of ~4 programs each.

    Measured on an H200 (132 multiprocessors, room for 5 programs each), head_dim 128, contexts
    of 100-2048 tokens in tables 2048 wide (the engine's captured decode graphs): 128 sequences
    at 4 kv heads (512 programs, one partial wave) took 0.101 ms unsplit and 0.093 ms with 2
    splits, at 8 kv heads 0.173 and 0.168 ms; 256 sequences at 4 kv heads 0.172 and 0.168 ms.
    Rounding up gives 512 programs their 2 splits and leaves 1024 unsplit. With equal contexts
    in a table just wide enough (64 sequences of ~1100 tokens, 8 kv heads) splitting cost
    instead: 0.084 ms unsplit, 0.095-0.096 ms with 2-3 splits. At 4 sequences of 32k tokens,
    0.76-0.82 ms unsplit and 0.087-0.121 ms with 9-64 splits.
    Depends only on shapes (`max_context` is the block table's capacity), so a captured CUDA
    graph replays as is.
    """
    programs = max(1, batch * num_kv_heads)
    wanted = triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, programs)
    tiles = triton.cdiv(max_context, BLOCK_N)
    return max(1, min(wanted, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its whole cached context (see `attention_ref`).

    query `[B, heads, head_dim]` (head_dim 64 or 128, fp16/bf16/fp32, same dtype as the cache),
    block_tables `[B, max_blocks]`, context_lens `[B]` (int32 or int64). Returns `[B, heads,
    head_dim]`. Rows with context length 0 return zeros.
    """
    return paged_decode_attention_splits(query, k_cache, v_cache, block_tables, context_lens,
                                         scale, num_splits=None)


def paged_decode_attention_splits(
    query, k_cache, v_cache, block_tables, context_lens, scale: float, num_splits: int | None,
    block_n: int = BLOCK_N, num_warps: int | None = None, num_stages: int = 2,
) -> torch.Tensor:
    """`paged_decode_attention` with an explicit split count and tile config (tests, tuning).

    `num_splits=None` picks it with `choose_num_splits`, as `paged_decode_attention` does.

    Default warps: 2 for head_dim 64 (0.153 vs 0.166 ms with 4 at batch 256, ~1100 tokens, on an
    H200), 4 for head_dim 128 (equal or better there).
    """
    block_size, num_kv_heads, num_heads, head_dim, group = check_attention_args(
        query, k_cache, v_cache)
    batch, device = query.shape[0], k_cache.device
    check_index("context_lens", context_lens, (batch,), device)
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [batch, max_blocks], got {tuple(block_tables.shape)}")
    check_index("block_tables", block_tables, (batch, block_tables.shape[1]), device)
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, _multiprocessors(device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    out = torch.empty(query.shape, dtype=query.dtype, device=device)
    if batch == 0:
        return out
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_context, 1), num_splits), block_n) * block_n
    parts = _partials(batch, num_heads, num_splits, head_dim, device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, out, *parts,
        scale * LOG2E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), tokens_per_split, num_splits,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        GROUP_P2=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, IS_SPLIT=num_splits > 1,
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps or (2 if head_dim == 64 else 4), num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            *parts, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, SPLIT_CHUNK=SPLIT_CHUNK,
        )
    return out


def _partials(batch, num_heads, num_splits, head_dim, device):
    """Float32 scratch for split results (unused, so tiny, when there is one split)."""
    if num_splits == 1:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, dummy, dummy
    acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return acc, m, torch.empty_like(m)
