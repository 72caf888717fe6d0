"""Small building blocks of the Llama-family model: norm, rotary embedding, attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.kernels import fused_ops
from pagedserve.kernels.fused_ops import add_rms_norm, rms_norm_ref
from pagedserve.replicas.models.rope import NATIVE_ROPE_TYPES, inverse_frequencies


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache.

    Sequences are packed in order; the first `num_decodes` have exactly one new token each
    (a decode), so they also own the first `num_decodes` rows, and take the decode kernel; the
    rest take the prefill kernel.
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] cached tokens after this step, per sequence
    query_start_loc: torch.Tensor  # [B + 1] offsets of each sequence's new tokens
    num_decodes: int
    max_query_len: int = 1  # longest run of new tokens of one sequence (prefill kernels' grid)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the reference implementation does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """`residual += x`, then the norm of it (one fused kernel on CUDA): (normed, residual)."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class Rope:
    """This step's rotary embedding, shared by every layer.

    On CPU it holds the looked-up cos/sin; on CUDA the table and the positions, which a fused
    kernel reads directly (one launch per tensor instead of a lookup plus six elementwise ops).
    """

    def __init__(self, table: torch.Tensor, positions: torch.Tensor, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.fused = positions.is_cuda and fused_ops.triton is not None
        self.table, self.positions = table, positions
        if not self.fused:
            half = head_dim // 2
            self.cos = table[0, :, :half][positions].unsqueeze(1).to(dtype)
            self.sin = table[1, :, :half][positions].unsqueeze(1).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotated `x` `[T, heads, head_dim]`; on CUDA `x` is rotated in place and returned."""
        if self.fused:
            fused_ops.rotary_inplace(x, self.table, self.positions)
            return x
        return apply_rotary(x, self.cos, self.sin)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding with any scaling transformers knows (default, linear, llama3...)."""

    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device) -> None:
        """(Re)compute the cos/sin table; called once the module sits on its device."""
        inv_freq, scaling = _rope_inverse_frequencies(self.hf_config, self.head_dim)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_sin = torch.stack((emb.cos() * scaling, emb.sin() * scaling)).to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotary embedding of this step's positions, shared by every layer."""
        return Rope(self.cos_sin, positions, self.head_dim, dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of `x` `[T, heads, head_dim]`.

    Same products and sums, in the same order, as `x * cos + rotate_half(x) * sin`.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rope_inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = {"rope_type": "default", **(getattr(hf_config, "rope_parameters", None) or {})}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if params["rope_type"] in NATIVE_ROPE_TYPES:
        return inverse_frequencies(params, head_dim)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # only for rarer kinds

    rope_type = params["rope_type"]
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq, float(scaling)
