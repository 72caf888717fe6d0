"""Prompt logprobs from a prefill's own hidden states (vLLM's `prompt_logprobs`).

A prefill chunk computes a hidden state for every prompt position it covers, and position p's
state predicts token p + 1: its log-softmax gives that prompt token's log-prob, with no second
pass. The logits are vocabulary-sized rows, so a step computes them a bounded number of rows at
a time on the device and keeps only what is returned (each token's log-prob and the top N);
their copy to the host starts at launch, so a pipelined step does not wait for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.replicas.engine.sampler import HostCopy
from pagedserve.replicas.engine.scheduler import SchedulerOutput
from pagedserve.replicas.engine.sequence import Sequence

# The KV cache is sized after measuring the sampling of `max_num_seqs` rows (several
# vocabulary-sized copies each); chunks of at most that many rows stay under that peak.
MAX_ROWS_PER_CHUNK = 256


def rows_per_chunk(max_num_seqs: int) -> int:
    return min(max_num_seqs, MAX_ROWS_PER_CHUNK)


@dataclass
class PromptScores:
    """The prompt positions one sequence scores in a step: consecutive rows of the step's
    hidden states, and the prompt tokens they predict."""

    seq: Sequence
    first_row: int
    targets: list[int]


def plan(batch: SchedulerOutput) -> list[PromptScores]:
    """What the batch scores (before the engine advances its sequences); usually nothing."""
    scores, row = [], 0
    for item in batch.scheduled:
        seq = item.seq
        positions = seq.positions_to_score(item.num_tokens)
        if positions:
            first_row = row + positions.start - seq.num_computed_tokens
            targets = seq.token_ids[positions.start + 1:positions.stop + 1]
            scores.append(PromptScores(seq, first_row, targets))
        row += item.num_tokens
    return scores


def hidden_rows(scores: list[PromptScores]) -> np.ndarray:
    """The hidden-state rows `scores` read, in order."""
    if not scores:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(s.first_row, s.first_row + len(s.targets), dtype=np.int64)
                           for s in scores])


def logits_in_chunks(model, hidden: torch.Tensor, rows: torch.Tensor,
                     chunk: int) -> Iterator[torch.Tensor]:
    """Float32 logits of `hidden[rows]`, `chunk` rows at a time. Under tensor parallelism each
    chunk is a collective: every rank iterates over the same rows."""
    for start in range(0, len(rows), chunk):
        yield model.compute_logits(hidden[rows[start:start + chunk]])


def follow(model, hidden: torch.Tensor, rows: torch.Tensor, chunk: int) -> None:
    """A tensor-parallel rank > 0's part of `score`: the same collectives (rank 0 gathers the
    logits and scores them)."""
    for _ in logits_in_chunks(model, hidden, rows, chunk):
        pass


def score(model, hidden: torch.Tensor, rows: torch.Tensor, scores: list[PromptScores],
          chunk: int) -> PendingPromptLogprobs:
    """Queue the scoring of `scores` (`rows`: `hidden_rows(scores)` on the device)."""
    targets = torch.tensor([t for s in scores for t in s.targets], dtype=torch.long)
    targets = targets.to(hidden.device, non_blocking=True)
    top_n = max(s.seq.params.prompt_logprobs for s in scores)
    values, ids = [], []
    for i, logits in enumerate(logits_in_chunks(model, hidden, rows, chunk)):
        logprobs = logits.log_softmax(dim=-1)
        picked = logprobs.gather(1, targets[i * chunk:(i + 1) * chunk, None])
        if top_n:
            top = logprobs.topk(top_n, dim=-1)
            picked = torch.cat([picked, top.values], dim=1)
            ids.append(top.indices)
        values.append(picked)
    return PendingPromptLogprobs(scores, torch.cat(values), torch.cat(ids) if ids else None)


class PendingPromptLogprobs:
    """A step's prompt scores on their way to the host; `result()` waits for them."""

    def __init__(self, scores: list[PromptScores], values: torch.Tensor,
                 top_ids: torch.Tensor | None) -> None:
        """`values`: per row, the target's log-prob then the top N's; `top_ids`: the top N."""
        self.scores = scores
        self._values = HostCopy(values)
        self._top_ids = HostCopy(top_ids) if top_ids is not None else None

    def result(self) -> list[tuple[Sequence, list[dict[int, float]]]]:
        """Per scored sequence, one `{token id: log-prob}` per position: the prompt token's
        and its `prompt_logprobs` most likely alternatives'."""
        values = self._values.wait().tolist()
        top_ids = self._top_ids.wait().tolist() if self._top_ids is not None else None
        out, row = [], 0
        for s in self.scores:
            n = s.seq.params.prompt_logprobs
            entries = []
            for target in s.targets:
                entry = {target: values[row][0]}
                if n:
                    entry.update(zip(top_ids[row][:n], values[row][1:n + 1], strict=True))
                entries.append(entry)
                row += 1
            out.append((s.seq, entries))
        return out
