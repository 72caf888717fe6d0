"""Paged decode attention in C for CPUs (float32): `cpu_attention.c`, called through ctypes.

Same signature and result as `attention_ref.paged_decode_attention`, which stays the oracle
(tests compare the two) and the fallback: callers check `supports` first, and `available()` is
False when the library cannot be built here. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels import cpu_build

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR,
             _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64]
_ERRORS = {1: (MemoryError, "out of memory for attention scores"),
           2: (ValueError, "a context length or block id is outside the block table or cache")}


def available() -> bool:
    """True once the library is built and loaded (the first call builds it)."""
    return _decode_fn() is not None


def supports(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The shapes and layouts the kernel handles; anything else goes to the reference."""
    return (
        query.device.type == "cpu"
        and query.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and query.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and query.stride(2) == 1 and query.stride(1) == query.shape[2]
        and query.shape[2] == k_cache.shape[3] and query.shape[1] % k_cache.shape[2] == 0
    )


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale):
    """See `attention_ref.paged_decode_attention`; `supports(...)` must hold."""
    if not supports(query, k_cache, v_cache):
        raise ValueError("cpu_attention: unsupported dtype, shape or layout; check supports() first")
    tables = _int32_rows(block_tables)
    lens = context_lens.to(torch.int32).contiguous()
    if tables.dim() != 2 or tables.shape[0] != query.shape[0] or lens.shape != (query.shape[0],):
        raise ValueError(f"cpu_attention: block_tables {tuple(block_tables.shape)} and "
                         f"context_lens {tuple(context_lens.shape)} must have {query.shape[0]} rows")
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty(batch, heads, head_dim, dtype=query.dtype)
    status = _decode_fn()(
        query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
        tables.data_ptr(), tables.stride(0), tables.shape[1], lens.data_ptr(), out.data_ptr(),
        batch, heads, kv_heads, head_dim, block_size, scale, torch.get_num_threads(),
    )
    if status:
        error, message = _ERRORS.get(status, (RuntimeError, f"status {status}"))
        raise error(f"cpu_attention: {message}")
    return out


def _int32_rows(block_tables: torch.Tensor) -> torch.Tensor:
    tables = block_tables.to(torch.int32)
    return tables if tables.stride(-1) == 1 else tables.contiguous()


def _decode_fn():
    lib = cpu_build.load("cpu_attention")
    if lib is None:
        return None
    fn = lib.paged_decode_f32
    if fn.argtypes is None:
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn
