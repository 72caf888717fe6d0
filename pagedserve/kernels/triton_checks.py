"""Argument checks shared by the Triton attention entry points.

The kernels compute addresses from a few strides and compile-time sizes, so every layout
assumption is checked here on the host (shapes, strides and dtypes only: no device syncs, so
the checks are safe inside CUDA-graph capture) and broken with a ValueError that names it.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
HEAD_DIMS = (64, 128)


def supports_attention(k_cache: torch.Tensor) -> bool:
    """Whether the attention kernels handle this cache's head_dim, block size and dtype.

    The dispatcher sends other shapes (e.g. tiny test models' head_dim 32) to the references.
    """
    if k_cache.dim() != 4 or k_cache.dtype not in FLOAT_DTYPES:
        return False
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    return head_dim in HEAD_DIMS and block_size >= 8 and not block_size & (block_size - 1)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Both caches `[num_blocks, block_size, kv_heads, head_dim]`, contiguous, same dtype/device."""
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be [num_blocks, block_size, kv_heads, head_dim], "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if k_cache.dtype not in FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache/v_cache must share one dtype of {FLOAT_DTYPES}, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"k_cache on {k_cache.device} but v_cache on {v_cache.device}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (slot addresses are computed "
                         "as block * block_size + row)")
    return tuple(k_cache.shape)


def check_block_size(block_size: int) -> None:
    """Block sizes are powers of two of at least 8, so tiles never straddle a block unevenly."""
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")


def check_head_dim(head_dim: int) -> None:
    """Head dims the attention kernels are compiled and tested for."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")


def check_rows(name: str, tensor: torch.Tensor, heads: int, head_dim: int,
               device: torch.device) -> None:
    """`[tokens, heads, head_dim]` with a unit stride along head_dim (other strides are passed)."""
    if tensor.dim() != 3 or tensor.shape[1:] != (heads, head_dim):
        raise ValueError(f"{name} must be [tokens, {heads}, {head_dim}], got "
                         f"{tuple(tensor.shape)}")
    if tensor.stride(2) != 1:
        raise ValueError(f"{name} must have stride 1 along head_dim, got {tensor.stride()}")
    if tensor.device != device:
        raise ValueError(f"{name} on {tensor.device} but the cache is on {device}")


def check_index(name: str, tensor: torch.Tensor, shape: tuple[int, ...],
                device: torch.device) -> None:
    """An int32/int64 index tensor of the given shape whose last dimension has stride 1."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {tensor.dtype}")
    if tensor.numel() > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 along its last dimension, got "
                         f"{tensor.stride()}")
    if tensor.device != device:
        raise ValueError(f"{name} on {tensor.device} but the cache is on {device}")


def check_attention_args(query: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Common checks of decode and prefill; returns (block_size, kv_heads, heads, head_dim, group)."""
    _, block_size, num_kv_heads, head_dim = check_cache(k_cache, v_cache)
    check_block_size(block_size)
    check_head_dim(head_dim)
    if query.dim() != 3:
        raise ValueError(f"query must be [tokens, heads, head_dim], got {tuple(query.shape)}")
    num_heads = query.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads "
                         f"({num_kv_heads})")
    check_rows("query", query, num_heads, head_dim, k_cache.device)
    if query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from cache dtype {k_cache.dtype}")
    return block_size, num_kv_heads, num_heads, head_dim, num_heads // num_kv_heads


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact products (tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"
