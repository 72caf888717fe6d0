"""Shared-prefix workloads for the routing benchmark: token-id prompts, no I/O.

Both are groups of requests that share a prefix and add their own suffix:
- `prefix` (vLLM's PrefixRepetition shape): many groups, a 512-token prefix, 128-token suffixes;
- `long_context`: a few 4k-token contexts (documents), each asked many 500-token questions.

Request j of every group comes before request j + 1 of any, so each group's requests are
interleaved with the other groups' and a router sees them arrive mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from benchmarks.throughput import FIRST_TOKEN_ID, Workload
except ModuleNotFoundError:  # run as `python benchmarks/prefix_routing.py`
    from throughput import FIRST_TOKEN_ID, Workload


@dataclass(frozen=True)
class SharedPrefixShape:
    """`groups` prefixes of `prefix_len` tokens, each shared by `per_group` requests that add
    `suffix_len` tokens of their own and generate `output_len` tokens."""

    groups: int
    per_group: int
    prefix_len: int
    suffix_len: int
    output_len: int

    def __post_init__(self) -> None:
        for name in ("groups", "per_group", "prefix_len", "suffix_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.suffix_len


def shared_prefix_workload(shape: SharedPrefixShape, vocab_size: int, seed: int) -> Workload:
    """The shape's prompts, groups interleaved (request j of each group, then j + 1)."""
    rng = np.random.default_rng(seed)
    prefixes = rng.integers(FIRST_TOKEN_ID, vocab_size, (shape.groups, shape.prefix_len)).tolist()
    suffixes = rng.integers(FIRST_TOKEN_ID, vocab_size,
                            (shape.per_group, shape.groups, shape.suffix_len)).tolist()
    prompts = [prefixes[g] + suffixes[j][g]
               for j in range(shape.per_group) for g in range(shape.groups)]
    return Workload(prompts, [shape.output_len] * len(prompts), vocab_size)


def best_hit_rate(shape: SharedPrefixShape, block_size: int) -> float:
    """The token-level prefix-cache hit rate if each group's prefix were computed once and
    every later request of the group found it (whole KV blocks only, as the engine caches)."""
    cached = shape.prefix_len // block_size * block_size
    return (shape.per_group - 1) * cached / (shape.per_group * shape.prompt_len)
