"""Attention kernels over the paged KV cache.

Every function here has a torch reference in `attention_ref`; the engine calls these names and
never the implementations directly, so faster versions can slot in behind the same signatures.
Imports only torch (and, for the fast versions, triton).
"""

from pagedserve.kernels.attention_ref import (
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
)

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]
