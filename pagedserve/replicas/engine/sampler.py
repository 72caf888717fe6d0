"""Turns one step's logits into next tokens: penalties, greedy, temperature, top-k/p, min-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.replicas.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # raw model log-probs: sampled + top alternatives


class Sampler:
    """Samples one token per row of `logits` `[N, vocab]` (float32) for the given sequences.

    Log-probabilities are those of the raw model distribution (before penalties and
    temperature), as OpenAI-style clients expect.
    """

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        raw_logprobs = _log_softmax_if_needed(logits, seqs)
        logits = logits.clone()
        self._apply_penalties(logits, seqs)
        self._block_early_stop(logits, seqs)
        tokens = self._sample(logits, seqs)
        token_list = tokens.tolist()
        logprobs = _gather_logprobs(raw_logprobs, token_list, seqs)
        return SampleResult(token_list, logprobs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
                values = logits[row, seen]
                logits[row, seen] = torch.where(
                    values > 0, values / p.repetition_penalty, values * p.repetition_penalty
                )
            if p.presence_penalty or p.frequency_penalty:
                counts = _output_counts(seq, logits.shape[1], logits.device)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _block_early_stop(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        vocab = logits.shape[1]
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                stops = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else self.eos_token_ids)
                # An id outside the vocabulary can never be sampled; indexing it would crash the step.
                stops = [t for t in stops if t < vocab]
                if stops:
                    logits[row, stops] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = _filtered_probs(logits[rows], [seqs[i] for i in random_rows])
            tokens[rows] = _exponential_race(probs, [seqs[i].generator for i in random_rows])
        return tokens


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    logits = logits / temperature[:, None]
    top_k = [s.params.top_k for s in seqs]
    if any(top_k):
        logits = _apply_top_k(logits, top_k)
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    if bool((top_p < 1).any()):
        probs = _apply_top_p(probs, top_p)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
    if bool((min_p > 0).any()):
        cutoff = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < cutoff, 0.0)
    return probs


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=logits.device)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample each row via argmax(p / E), E ~ Exp(1): one pass, per-row seeds honoured."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row] = torch.empty(probs.shape[1]).exponential_(generator=generator).to(probs.device)
    return (probs / noise.clamp_(min=1e-20)).argmax(dim=-1)


def _output_counts(seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
    out = torch.tensor(seq.output_token_ids, dtype=torch.long)
    return torch.bincount(out, minlength=vocab)[:vocab].to(device=device, dtype=torch.float32)


def _log_softmax_if_needed(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor | None:
    if all(s.params.logprobs is None for s in seqs):
        return None
    return logits.log_softmax(dim=-1)


def _gather_logprobs(raw: torch.Tensor | None, tokens: list[int], seqs: list[Sequence]):
    if raw is None:
        return [None] * len(seqs)
    result: list[dict[int, float] | None] = []
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None:
            result.append(None)
            continue
        entry = {tokens[row]: float(raw[row, tokens[row]])}
        if k > 0:
            values, ids = raw[row].topk(k)
            entry.update(zip(ids.tolist(), values.tolist(), strict=True))
        result.append(entry)
    return result
