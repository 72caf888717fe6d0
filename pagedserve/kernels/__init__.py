"""Attention kernels over the paged KV cache.

Every function here has a torch reference in `attention_ref`; the engine calls these names and
never the implementations directly, so faster versions slot in behind the same signatures.
CUDA tensors go to the Triton kernels (`triton_store_kv`, `triton_decode`, `triton_prefill`),
except attention calls whose head_dim or block size they do not support
(`triton_checks.supports_attention`: a shape test, no device sync). On a CPU, float32 decode
attention goes to a C kernel (`cpu_attention`, compiled on first use) when it can be built;
everything else goes to the references. `PAGEDSERVE_ATTENTION=torch` forces the references
everywhere (to compare, or to rule the kernels out). Imports only torch (and triton, lazily: the
CPU engine never pays for importing it).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from pagedserve.kernels import attention_ref, cpu_attention
from pagedserve.kernels.triton_checks import supports_attention

_BACKENDS = ("", "auto", "triton", "torch")
_triton_modules: dict[str, ModuleType] = {}


def _references_forced() -> bool:
    choice = os.environ.get("PAGEDSERVE_ATTENTION", "").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"PAGEDSERVE_ATTENTION must be one of {_BACKENDS[1:]}, got {choice!r}")
    return choice == "torch"


def _use_triton(tensor: torch.Tensor) -> bool:
    return not _references_forced() and tensor.is_cuda


def _use_cpu_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (not _references_forced() and not query.is_cuda
            and cpu_attention.supports(query, k_cache, v_cache) and cpu_attention.available())


def _triton(name: str) -> ModuleType:
    # Imported on first use: `triton.jit` reads TRITON_INTERPRET when a kernel is defined.
    if name not in _triton_modules:
        _triton_modules[name] = importlib.import_module(f"pagedserve.kernels.{name}")
    return _triton_modules[name]


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write `key`/`value` rows `[T, kv_heads, head_dim]` into their cache slots; -1 is skipped."""
    impl = _triton("triton_store_kv") if _use_triton(k_cache) else attention_ref
    impl.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale):
    """One query per sequence over its paged context; see `attention_ref.paged_decode_attention`."""
    if _use_cpu_decode(query, k_cache, v_cache):
        impl = cpu_attention
    elif _use_triton(query) and supports_attention(k_cache):
        impl = _triton("triton_decode")
    else:
        impl = attention_ref
    return impl.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc,
                            context_lens, scale):
    """Causal packed-prefill attention; see `attention_ref.paged_prefill_attention`."""
    use = _use_triton(query) and supports_attention(k_cache)
    impl = _triton("triton_prefill") if use else attention_ref
    return impl.paged_prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc,
                                        context_lens, scale)


__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]
