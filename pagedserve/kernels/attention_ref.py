"""Torch reference implementations of the paged-KV attention kernels.

Cache layout, one tensor per layer and per K/V: `[num_blocks, block_size, num_kv_heads, head_dim]`.
A sequence's token at position p lives in block `block_table[p // block_size]`, row
`p % block_size`; its flat slot is `block_id * block_size + row`.

These run everywhere (the CPU engine uses them) and are the oracle the Triton kernels are
tested against, so they favour clarity over speed where the two conflict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `key`/`value` rows `[T, kv_heads, head_dim]` into their cache slots; slot -1 is skipped."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    flat_k.index_copy_(0, slot_mapping, key.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(flat_v.dtype))


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """The first `length` cached rows of one sequence: `[length, kv_heads, head_dim]`."""
    num_blocks_used = -(-length // cache.shape[1])
    rows = cache[block_table[:num_blocks_used]]
    return rows.reshape(-1, cache.shape[2], cache.shape[3])[:length]


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its whole cached context.

    query `[B, heads, head_dim]`, block_tables `[B, max_blocks]` (int32, padded with any valid id),
    context_lens `[B]` (tokens in cache, including the one this query belongs to). GQA when
    heads is a multiple of kv_heads. Returns `[B, heads, head_dim]`.

    Sequences are grouped by length so each group's gathered K/V is padded only to its own
    longest member: on a CPU the gather, not the arithmetic, is what costs.
    """
    batch = query.shape[0]
    if batch <= _DECODE_GROUP:
        return _decode_group(query, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(query)
    order = torch.argsort(context_lens.to(query.device))
    for rows in order.split(_DECODE_GROUP):
        out[rows] = _decode_group(query[rows], k_cache, v_cache, block_tables[rows],
                                  context_lens[rows], scale)
    return out


_DECODE_GROUP = 8


def _decode_group(query, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(context_lens.max())
    blocks_needed = -(-max_len // block_size)
    table = block_tables[:, :blocks_needed].reshape(-1).long()
    keys = k_cache.index_select(0, table).view(batch, -1, num_kv_heads, head_dim)
    values = v_cache.index_select(0, table).view(batch, -1, num_kv_heads, head_dim)
    positions = torch.arange(keys.shape[1], device=query.device)
    mask = positions[None, :] < context_lens[:, None].to(query.device)
    if query.device.type == "cpu" and query.dtype != torch.float32:
        return _decode_math_fp32(query, keys, values, mask, scale)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [B, H, 1, D]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out.squeeze(2)


def _decode_math_fp32(query, keys, values, mask, scale) -> torch.Tensor:
    """Single-query attention in float32 arithmetic.

    For 16-bit inputs on a CPU the fused SDPA kernel is ~3x slower than these plain products.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = torch.einsum("bkgd,bskd->bkgs", q, keys.float()) * scale
    scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bskd->bkgd", scores.softmax(dim=-1), values.float())
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


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

    query `[T, heads, head_dim]` packs each sequence's new tokens; sequence i owns rows
    `query_start_loc[i]:query_start_loc[i+1]` and those tokens are the last ones of its
    `context_lens[i]` cached tokens (any earlier ones are a cached prefix or earlier chunks).
    The new tokens' K/V must already be stored. Returns `[T, heads, head_dim]`.
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lengths = context_lens.tolist()
    for i, context_len in enumerate(lengths):
        start, end = starts[i], starts[i + 1]
        q = query[start:end].transpose(0, 1)  # [H, q_len, D]
        k = gather_kv(k_cache, block_tables[i], context_len).transpose(0, 1)
        v = gather_kv(v_cache, block_tables[i], context_len).transpose(0, 1)
        out[start:end] = _causal_attention(q, k, v, scale).transpose(0, 1)
    return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    q_len, kv_len = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # 3-D input takes SDPA's slow path
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)[0]
    # The queries are the last q_len positions: query j may see keys up to kv_len - q_len + j.
    offset = kv_len - q_len
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)[0]
