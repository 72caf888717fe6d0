"""Triton `store_kv`: scatter new K/V rows into their paged-cache slots (slot -1 = skip)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton_checks import check_cache, check_index, check_rows


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: all its kv heads at once, so each program moves a whole row.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # a token whose K/V must not be kept (padding)
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    # Contiguous cache: flat slot s of [num_blocks, block_size, ...] starts at s * row_size.
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `key`/`value` rows `[T, kv_heads, head_dim]` into their cache slots; slot -1 is skipped.

    Same contract as `attention_ref.store_kv`; rows are cast to the cache dtype. The caches must be
    contiguous; key/value may be strided views (e.g. columns of a fused QKV output) as long as
    head_dim has stride 1.
    """
    _, _, num_kv_heads, head_dim = check_cache(k_cache, v_cache)
    device = k_cache.device
    check_rows("key", key, num_kv_heads, head_dim, device)
    check_rows("value", value, num_kv_heads, head_dim, device)
    num_tokens = key.shape[0]
    if value.shape[0] != num_tokens:
        raise ValueError(f"key has {num_tokens} rows but value has {value.shape[0]}")
    check_index("slot_mapping", slot_mapping, (num_tokens,), device)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
