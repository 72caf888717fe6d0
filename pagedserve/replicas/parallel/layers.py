"""Tensor-parallel building blocks (Megatron style): each rank holds a slice of every large weight.

- Column-parallel linear: the weight's output rows are split; each rank computes its own output
  columns (its attention heads, its part of the MLP's intermediate size) and needs no exchange.
- Row-parallel linear: the weight's input columns are split; each rank's partial product is
  summed across ranks with one all-reduce, then the (replicated) bias is added once.
- Vocab-parallel embedding and LM head: the vocabulary is split; an embedding row is looked up
  on the one rank that holds it (zeros elsewhere, then an all-reduce), and the LM head's logits
  are gathered from every rank.

Each parallel module names the dimension each of its split parameters is split along
(`split_dims`), so the loader reads only this rank's slice of the checkpoint tensor. No Ray
here: the group is a plain torch.distributed process group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels.cpu_linear import Linear
from pagedserve.replicas.parallel import symmetric_all_reduce
from pagedserve.replicas.parallel.symmetric_all_reduce import SymmetricAllReduce

logger = logging.getLogger(__name__)


@dataclass
class TensorParallel:
    """This process's place in a tensor-parallel group: `rank` of `size` ranks on `device`.

    `one_shot`, set by `use_one_shot_all_reduce`, takes the small all-reduces on GPUs.
    """

    rank: int
    size: int
    device: torch.device
    one_shot: SymmetricAllReduce | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (in place, or in a new tensor: use the result)."""
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        dist.all_reduce(x)
        return x

    def sum_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm):
        """`norm.add_norm(sum of x over the ranks, residual)`: one kernel on GPUs where the
        one-shot buffer holds `x`, else an all-reduce then the norm."""
        if self.one_shot is not None and self.one_shot.fits_rows(x):
            return self.one_shot.add_norm(x, residual, norm.weight, norm.eps)
        return norm.add_norm(self.all_reduce(x), residual)

    def use_one_shot_all_reduce(self, dtype: torch.dtype) -> None:
        """Set up the symmetric-memory all-reduce on GPUs (collective: every rank calls it at
        the same point). If it fails on any rank, every rank keeps NCCL."""
        if self.device.type != "cuda" or not symmetric_all_reduce.enabled():
            return
        if not self.symmetric_history_agrees():
            logger.warning("symmetric memory already served an earlier tensor-parallel group in "
                           "this process (its ranks would not meet); this group uses NCCL")
            return
        one_shot = None
        try:
            if symmetric_all_reduce.available():
                one_shot = SymmetricAllReduce(self.device, dtype)
                one_shot(torch.zeros(64, dtype=dtype, device=self.device))  # the kernel runs here
        except Exception as err:  # no peer access between these GPUs, an older torch, ...
            logger.warning("symmetric-memory all-reduce unavailable, using NCCL: %r", err)
            one_shot = None
        if self.min_int(int(one_shot is not None)):
            self.one_shot = one_shot
            logger.info("tensor-parallel all-reduce: one-shot through symmetric memory up to "
                        "%d KiB, NCCL above", symmetric_all_reduce.MAX_BYTES // 1024)
        elif one_shot is not None:
            one_shot.release()

    def symmetric_history_agrees(self) -> bool:
        """Every rank's process made as many symmetric-memory rendezvous so far (collective)."""
        calls = symmetric_all_reduce.rendezvous_calls()
        return self.min_int(calls) == -self.min_int(-calls)

    def release(self) -> None:
        """Free what the group holds beyond torch.distributed (before it is destroyed)."""
        if self.one_shot is not None:
            self.one_shot.release()
            self.one_shot = None

    def stack_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x`, stacked in rank order: [size, *x.shape] (the same on all ranks)."""
        return torch.stack(self._every_rank(x))

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along its last dimension (the same result on all ranks)."""
        return torch.cat(self._every_rank(x), dim=-1)

    def _every_rank(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x`, in rank order (an all-gather)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return parts

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (they must agree on sizes such as the KV cache)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int,
                          tp_size: int) -> None:
    """Raise ValueError unless the attention heads, KV heads and MLP width split evenly."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if num_heads % tp_size or num_kv_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the model's num_attention_heads "
            f"({num_heads}) and num_key_value_heads ({num_kv_heads}); "
            f"sizes that do: {_divisors(num_heads, num_kv_heads)}"
        )
    if intermediate_size % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the model's intermediate_size "
            f"({intermediate_size})"
        )


def _divisors(*numbers: int) -> list[int]:
    return [d for d in range(1, min(numbers) + 1) if all(n % d == 0 for n in numbers)]


def split_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dimension it is split along across ranks (absent: replicated)."""
    dims = {}
    for prefix, module in model.named_modules():
        for name, dim in getattr(module, "split_dims", {}).items():
            if getattr(module, name, None) is not None:
                dims[f"{prefix}.{name}" if prefix else name] = dim
    return dims


class ColumnParallelLinear(Linear):
    """A linear layer holding `out_features // tp.size` output rows: this rank's columns of y."""

    split_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel,
                 pieces: int = 1) -> None:
        super().__init__(in_features, out_features // tp.size, bias=bias, pieces=pieces)


class RowParallelLinear(Linear):
    """A linear layer holding `in_features // tp.size` input columns; each rank's output is a
    part of a sum over the ranks."""

    split_dims = {"weight": 1}  # the bias is whole on every rank; rank 0 adds it to its part

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the output, whose sum over the ranks is the layer's output; the
        norm that follows adds the parts up (`TensorParallel.sum_add_norm`), fused with it.
        The bias is in rank 0's part."""
        y = self.product(x, None)
        return y + self.bias if self.bias is not None and self.tp.rank == 0 else y


def vocab_shard_size(vocab_size: int, tp_size: int) -> int:
    """Rows of the vocabulary per rank; the last rank's shard is padded when it does not divide."""
    return -(-vocab_size // tp_size)


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across ranks."""

    split_dims = {"weight": 0}

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.shard = vocab_shard_size(vocab_size, tp.size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's part of the embeddings (zero rows for ids it does not hold), to be
        summed over the ranks like a row-parallel output."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return out.masked_fill_(outside.unsqueeze(-1), 0)


class ParallelLMHead(Linear):
    """The LM head's vocabulary rows of this rank; `gather` joins the ranks' logits."""

    split_dims = {"weight": 0}

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__(hidden_size, vocab_shard_size(vocab_size, tp.size), bias=False)
        self.tp, self.vocab_size = tp, vocab_size

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_last_dim(local_logits)[:, : self.vocab_size]

    def argmax(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax over the whole vocabulary, without gathering the logits: the same
        ids, on every rank, as `gather(...).float().argmax(-1)` (the first maximum wins).

        Each rank sends only its shard's best (value, id) per row; the float32 value is exact
        for bf16 and fp16 logits, and ids below 2**24 are exact in float32.
        """
        start = self.tp.rank * self.out_features
        valid = local_logits[:, : max(1, self.vocab_size - start)]  # not the padded rows
        ids = valid.argmax(dim=-1, keepdim=True)
        best = torch.cat([valid.gather(1, ids).float(), (ids + start).float()], dim=1)
        every = self.tp.stack_over_ranks(best)  # [ranks, rows, (value, id)]
        rank = every[..., 0].argmax(dim=0, keepdim=True)  # ties: the lowest rank, lowest id
        return every[..., 1].gather(0, rank).squeeze(0).long()


def column_linear(in_features: int, out_features: int, bias: bool,
                  tp: TensorParallel | None, pieces: int = 1) -> Linear:
    """A `Linear` on one device, a column-parallel one under tensor parallelism. `pieces`: equal
    slices of the output (e.g. gate and up) that `Linear.forward_pieces` returns apart."""
    if tp is None:
        return Linear(in_features, out_features, bias=bias, pieces=pieces)
    return ColumnParallelLinear(in_features, out_features, bias, tp, pieces)


def row_linear(in_features: int, out_features: int, bias: bool,
               tp: TensorParallel | None) -> Linear:
    """A `Linear` on one device, a row-parallel one (each rank an addend) under tensor parallelism."""
    if tp is None:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


def embedding(vocab_size: int, hidden_size: int, tp: TensorParallel | None) -> nn.Module:
    if tp is None:
        # An explicit (uninitialised) weight: the default init's `normal_` on the meta device
        # goes through torch._refs, whose first use imports torch._dynamo (1-4 s at start).
        return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def lm_head(vocab_size: int, hidden_size: int, tp: TensorParallel | None) -> Linear:
    if tp is None:
        return Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(vocab_size, hidden_size, tp)
