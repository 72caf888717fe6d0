"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over the paged KV cache."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve import kernels
from pagedserve.kernels.fused_ops import silu_and_mul
from pagedserve.replicas.models.layers import AttentionMetadata, RMSNorm, Rope, RotaryEmbedding
from pagedserve.replicas.models.spec import ModelSpec
from pagedserve.replicas.parallel import layers as parallel
from pagedserve.replicas.parallel.layers import TensorParallel


def _tp_size(tp: TensorParallel | None) -> int:
    return 1 if tp is None else tp.size


def add_norm(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
             tp: TensorParallel | None):
    """`norm.add_norm(x, residual)`; under tensor parallelism `x` is this rank's part of a sum
    over the ranks (an embedding or row-parallel output), added up first or in the same kernel."""
    if tp is None:
        return norm.add_norm(x, residual)
    return tp.sum_add_norm(x, residual, norm)


class Attention(nn.Module):
    """Self-attention with merged QKV, optional per-head q/k norm (Qwen3) and GQA.

    Under tensor parallelism this rank holds `1 / tp.size` of the heads and KV heads.
    """

    def __init__(self, spec: ModelSpec, tp: TensorParallel | None = None) -> None:
        super().__init__()
        ranks = _tp_size(tp)
        self.num_heads, self.num_kv_heads = spec.num_heads // ranks, spec.num_kv_heads // ranks
        self.head_dim = spec.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        full_qkv = (spec.num_heads + 2 * spec.num_kv_heads) * self.head_dim
        self.qkv_proj = parallel.column_linear(spec.hidden_size, full_qkv, spec.qkv_bias, tp)
        self.o_proj = parallel.row_linear(spec.num_heads * self.head_dim, spec.hidden_size,
                                          spec.o_bias, tp)
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(self, rope, hidden, meta: AttentionMetadata, kv_cache: torch.Tensor):
        qkv = self.qkv_proj(hidden)
        q, k = self._rotated_qk(qkv, rope)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = _paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))

    def _rotated_qk(self, qkv: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:  # rotate q and k in one pass over their adjacent columns
            qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                           self.head_dim)
            qk = rope(qk)
            return qk[:, : self.num_heads], qk[:, self.num_heads:]
        q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(-1, self.num_kv_heads, self.head_dim)
        return rope(self.q_norm(q)), rope(self.k_norm(k))


# A prefill kernel that sizes its grid from the longest query takes it from the host, not a sync.
_PREFILL_TAKES_MAX_QUERY_LEN = (
    "max_query_len" in inspect.signature(kernels.paged_prefill_attention).parameters
)


def _paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    nd = meta.num_decodes  # one query row each, so also the number of decode rows
    if nd == q.shape[0]:
        return kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale
        )
    prefill_starts = meta.query_start_loc[nd:] - nd
    extra = {"max_query_len": meta.max_query_len} if _PREFILL_TAKES_MAX_QUERY_LEN else {}
    prefill = kernels.paged_prefill_attention(
        q[nd:], k_cache, v_cache, meta.block_tables[nd:], prefill_starts,
        meta.context_lens[nd:], scale, **extra,
    )
    if nd == 0:
        return prefill
    decode = kernels.paged_decode_attention(
        q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd], scale
    )
    return torch.cat((decode, prefill))


class MLP(nn.Module):
    """SiLU-gated MLP with merged gate/up projection."""

    def __init__(self, spec: ModelSpec, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.gate_up_proj = parallel.column_linear(spec.hidden_size, 2 * spec.intermediate_size,
                                                   spec.mlp_bias, tp, pieces=2)
        self.down_proj = parallel.row_linear(spec.intermediate_size, spec.hidden_size,
                                             spec.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        # On a CPU two matmuls over the weight's halves beat one: SiLU and the product then run
        # on contiguous tensors, several times faster than on the strided halves of one output.
        gate, up = self.gate_up_proj.forward_pieces(x)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, tp)
        self.tp = tp

    def forward(self, rope, hidden, residual, meta, kv_cache):
        """Pre-norm layer; the residual add is fused into the next norm: (output, residual).

        Under tensor parallelism the input and output are this rank's parts of sums over the
        ranks, which the norms add up (`add_norm`)."""
        hidden, residual = add_norm(self.input_layernorm, hidden, residual, self.tp)
        hidden = self.self_attn(rope, hidden, meta, kv_cache)
        hidden, residual = add_norm(self.post_attention_layernorm, hidden, residual, self.tp)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(spec.hf_config, spec.head_dim, spec.max_position_embeddings)
        self.embed_tokens = parallel.embedding(spec.vocab_size, spec.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, tp) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.tp = tp

    def forward(self, input_ids, positions, meta, kv_caches):
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, meta, kv_cache)
        return add_norm(self.norm, hidden, residual, self.tp)[0]


_CPU_VOCAB_SLICE = 2048


class LlamaForCausalLM(nn.Module):
    """The whole causal LM: `forward` gives final hidden states, `compute_logits` float32 logits.

    With `tp` (a tensor-parallel group of more than one rank) it holds this rank's shard of
    every large weight; `compute_logits` then gathers the whole vocabulary on every rank.
    """

    # checkpoint name -> (our merged parameter, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.spec, self.tp = spec, tp
        self.model = LlamaModel(spec, tp)
        self.lm_head = parallel.lm_head(spec.vocab_size, spec.hidden_size, tp)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (again after `to_empty`, which unties them)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._local_logits(hidden)
        if self.tp is not None:  # a collective: every rank must call it for the same step
            logits = self.lm_head.gather(logits)
        return logits.float()

    def greedy_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """`compute_logits(hidden).argmax(-1)`; under tensor parallelism without gathering the
        vocabulary (a collective, like `compute_logits`: every rank gets the ids)."""
        logits = self._local_logits(hidden)
        if self.tp is not None:
            return self.lm_head.argmax(logits)
        return logits.float().argmax(dim=-1)

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda or self.lm_head.packed is not None:
            return self.lm_head(hidden)
        # Unpacked, a CPU matmul against the whole vocabulary at once falls out of cache; slices
        # of the vocabulary give the same values (each logit is still one dot product) ~30% faster.
        slices = self.lm_head.weight.split(_CPU_VOCAB_SLICE)
        return torch.cat([F.linear(hidden, w) for w in slices], dim=-1)
