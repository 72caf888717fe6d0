"""Turns one step's logits into next tokens: penalties, greedy, temperature, top-k/p, min-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.replicas.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # raw model log-probs: sampled + top alternatives
    # the step's prompt logprobs: per sequence that scored prompt tokens, their entries
    prompt_logprobs: list[tuple[Sequence, list[dict[int, float]]]] = field(default_factory=list)


class Sampler:
    """Samples one token per row of `logits` `[N, vocab]` (float32) for the given sequences.

    Log-probabilities are those of the raw model distribution (before penalties and
    temperature), as OpenAI-style clients expect.

    Everything stays on the logits' device; which paths run is decided from the parameters on
    the host, so the only device-to-host transfer of a step is the sampled ids (and the
    requested logprobs). `sample_async` returns before that transfer.
    """

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        return self.sample_async(logits, seqs).result()

    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingSample:
        """Queue the sampling kernels; `.result()` on the return value waits for the ids."""
        raw_logprobs = _log_softmax_if_needed(logits, seqs)
        if any(_edits_logits(s) for s in seqs):
            logits = logits.clone()
            self._apply_penalties(logits, seqs)
            _apply_logit_bias(logits, seqs)
            self._block_early_stop(logits, seqs)
            _apply_grammars(logits, seqs)
        tokens = self._sample(logits, seqs)
        return PendingSample(tokens, raw_logprobs, seqs)

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
            if seq.matcher is None and seq.num_output_tokens < seq.params.min_tokens:
                stops = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else self.eos_token_ids)
                # An id outside the vocabulary can never be sampled; indexing it would crash the step.
                stops = [t for t in stops if t < vocab]
                if stops:
                    logits[row, stops] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        if len(random_rows) == len(seqs):  # no row gather or scatter needed
            return _exponential_race(_filtered_probs(logits, seqs), [s.generator for s in seqs])
        tokens = logits.argmax(dim=-1)
        rows = _device_list(random_rows, torch.long, logits.device)
        random_seqs = [seqs[i] for i in random_rows]
        probs = _filtered_probs(logits[rows], random_seqs)
        tokens[rows] = _exponential_race(probs, [s.generator for s in random_seqs])
        return tokens


class HostCopy:
    """A device tensor's copy to the host, started now; `wait()` returns it once it arrived."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor, self._event = tensor, None
        if tensor.is_cuda:  # start the copy now; wait() then only waits for it
            self._tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._tensor.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._tensor


class PendingSample:
    """Sampled ids still on the device; `result()` copies them (and logprobs) to the host once.

    `tokens` is None for a step that samples nothing but scores prompt tokens (`prompt`, a
    `PendingPromptLogprobs`, set by the model runner)."""

    def __init__(self, tokens: torch.Tensor | None, raw_logprobs: torch.Tensor | None,
                 seqs: list[Sequence]) -> None:
        self.tokens, self.raw_logprobs, self.seqs = tokens, raw_logprobs, seqs
        self._copy = HostCopy(tokens) if tokens is not None else None
        self.prompt = None

    def result(self) -> SampleResult:
        token_list = self._copy.wait().tolist() if self._copy is not None else []
        prompt = self.prompt.result() if self.prompt is not None else []
        return SampleResult(token_list, _gather_logprobs(self.raw_logprobs, token_list, self.seqs),
                            prompt)


def plain_greedy(seqs: list[Sequence]) -> bool:
    """Every sequence takes the most likely token, with no penalty, stop block or logprobs:
    their ids depend on nothing but each row's argmax."""
    return all(s.params.greedy and s.params.logprobs is None and not _edits_logits(s)
               for s in seqs)


def _edits_logits(seq: Sequence) -> bool:
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens or bool(p.logit_bias)
            or seq.matcher is not None)


def _apply_grammars(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Mask each structured row to the tokens its grammar allows next (a grammar, not
    min_tokens, decides when such a sequence may stop)."""
    grammars = next((s.grammars for s in seqs if s.matcher is not None), None)
    if grammars is not None:
        grammars.mask(logits, [s.matcher for s in seqs])


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Add each request's `logit_bias` to its row (ids were checked against the vocabulary)."""
    for row, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long).to(logits.device, non_blocking=True)
            values = torch.tensor(list(bias.values()), dtype=logits.dtype)
            logits[row].index_add_(0, ids, values.to(logits.device, non_blocking=True))


def _device_list(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    device = logits.device
    temperatures = [s.params.temperature for s in seqs]
    if len(set(temperatures)) == 1:
        logits = logits / temperatures[0]
    else:
        logits = logits / _device_list(temperatures, torch.float32, device)[:, None]
    top_k = [s.params.top_k for s in seqs]
    if any(top_k):
        logits = _apply_top_k(logits, top_k)
    probs = logits.softmax(dim=-1)
    top_p = [s.params.top_p for s in seqs]
    if any(p < 1 for p in top_p):
        probs = _apply_top_p(probs, _device_list(top_p, torch.float32, device))
    min_p = [s.params.min_p for s in seqs]
    if any(p > 0 for p in min_p):
        cutoff = _device_list(min_p, torch.float32, device)[:, None] * probs.max(
            dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < cutoff, 0.0)
    return probs


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    k = _device_list([min(k, vocab) if k > 0 else vocab for k in top_k], torch.long, logits.device)
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
