"""One generated sequence: its tokens, its place in the KV cache and its progress."""

from __future__ import annotations

import enum
import itertools
import sys
import time

import torch

from pagedserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


_seq_ids = itertools.count()

# Stands in `token_ids` for a token sampled by a step still running on the device.
PLACEHOLDER = -1


class Sequence:
    """A prompt plus the tokens generated for it so far.

    `num_computed_tokens` counts tokens whose K/V are in the cache (cached prefix included);
    the scheduler computes the rest in one or more chunks. The last token of a running
    sequence is never computed until the next step, as it is the one that step feeds in.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, block_size: int, arrival_time: float | None = None) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.params = params
        self.block_size = block_size
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_hashed_blocks = 0  # full blocks whose hash is registered in the cache
        self.block_table: list[int] = []
        self.block_table_array = None  # (table list, its numpy copy): see step_inputs
        self.block_hashes: list[int] = []
        self.status = SequenceStatus.WAITING
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        # prompt_logprobs: one entry per prompt token scored so far (the first has none), and
        # how many prompt positions were launched for scoring (a recompute skips those)
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.num_scored_positions = 0
        self.generator = _make_generator(params.seed, index)
        self.leader: Sequence | None = None  # n > 1: completion 0, whose prompt blocks we share
        self.grammars = None  # structured output: the engine's `Grammars` and this seq's matcher
        self.matcher = None
        self.max_len = sys.maxsize  # prompt + the most output tokens its request allows

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def all_tokens_sampled(self) -> bool:
        """Every allowed token exists (maybe as a placeholder) and the prompt is computed, so
        nothing is left to compute (with no output allowed, the prompt is all there is)."""
        return (len(self.token_ids) >= self.max_len
                and self.num_computed_tokens >= self.num_prompt_tokens)

    @property
    def scores_prompt(self) -> bool:
        """This sequence computes its request's prompt logprobs (completion 0 does, for all n)."""
        return self.prompt_logprobs is not None and self.leader is None

    def positions_to_score(self, num_tokens: int) -> range:
        """Positions among the next `num_tokens` computed whose hidden states predict a prompt
        token not scored yet (position p predicts token p + 1)."""
        if not self.scores_prompt:
            return range(0)
        start = max(self.num_computed_tokens, self.num_scored_positions)
        end = min(self.num_computed_tokens + num_tokens, self.num_prompt_tokens - 1)
        return range(start, max(start, end))

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more as computed (their step is launched), and the prompt
        positions they score."""
        scored = self.positions_to_score(num_tokens)
        if scored:
            self.num_scored_positions = scored.stop
        self.num_computed_tokens += num_tokens

    def drop_placeholders(self) -> None:
        """Forget tokens still in flight (the sequence ended before they arrived)."""
        while self.token_ids and self.token_ids[-1] == PLACEHOLDER:
            self.token_ids.pop()

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    @property
    def ready_to_schedule(self) -> bool:
        """A sibling waits until its leader's prompt is in the cache, then shares those blocks."""
        leader = self.leader
        return leader is None or leader.is_finished or (
            leader.num_computed_tokens >= leader.num_prompt_tokens
        )

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Forget the KV cache (preemption); prompt and generated tokens are kept."""
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING


def _make_generator(seed: int | None, index: int) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + index) & 0xFFFF_FFFF_FFFF)
    return generator
