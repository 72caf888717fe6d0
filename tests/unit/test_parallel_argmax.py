"""Greedy ids from a vocab-parallel LM head without gathering the logits (two gloo ranks)."""

from __future__ import annotations

import torch
from two_ranks import run_two_ranks

from pagedserve.replicas.parallel.layers import ParallelLMHead, TensorParallel

VOCAB, HIDDEN = 11, 4  # two ranks: ids 0-5 and 6-10, plus one padded row on rank 1


def whole_vocab_logits() -> torch.Tensor:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[1, 2] = logits[1, 8] = 9.0  # a tie across the ranks: the lower id wins
    logits[2] = -torch.arange(1, VOCAB + 1.0)  # all negative: the padded row (0) must not win
    logits[3, 7] = logits[3, 9] = 9.0  # a tie inside rank 1's shard
    logits[4, 5] = logits[4, 6] = 9.0  # a tie at the shard boundary
    logits[5, 10] = 9.0  # the last real id
    return logits.to(torch.bfloat16)


def _ids_on_rank(rank: int) -> list[int]:
    head = ParallelLMHead(VOCAB, HIDDEN, TensorParallel(rank, 2, torch.device("cpu")))
    shard = head.out_features
    local = torch.zeros(6, shard, dtype=torch.bfloat16)  # the padded column stays 0
    part = whole_vocab_logits()[:, rank * shard : (rank + 1) * shard]
    local[:, : part.shape[1]] = part
    gathered = head.gather(local).float().argmax(dim=-1)
    ids = head.argmax(local)
    return [ids.tolist(), gathered.tolist()]


def test_sharded_argmax_equals_argmax_of_the_gathered_logits_on_every_rank():
    expected = whole_vocab_logits().float().argmax(dim=-1).tolist()
    assert expected[1:] == [2, 0, 7, 5, 10]
    out = run_two_ranks(_ids_on_rank)
    assert out == {0: [expected, expected], 1: [expected, expected]}
