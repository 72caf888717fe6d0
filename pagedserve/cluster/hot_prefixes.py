"""The cluster's hottest prompt prefixes, counted by the router with decay. No Ray here.

Every admitted request brings its chained block hashes (the engine's own: a block's hash covers
every token before it) and its first `max_tokens` prompt tokens. Each hash gets a hit whose
weight halves every `half_life_s`; a prefix's worth is its decayed hits times its length (the
prefill it saves). `top(k)` returns the token ids of the k best prefixes that do not lie inside a
better one, for a new replica to prefill before it reports ready, so its first requests hit its
prefix cache as they would on an old replica.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    score: float  # decayed hits, in units of "now"
    stamp: float  # when `score` was last brought up to date
    depth: int  # blocks in the prefix
    length: int  # tokens in the prefix
    tokens: tuple[int, ...]  # a prompt's first tokens (at least `length`)
    parent: int | None  # the hash one block shorter


class HotPrefixes:
    """Decayed hit counts per prefix block hash, bounded to `max_entries` hashes."""

    def __init__(self, half_life_s: float, max_tokens: int, clock: Callable[[], float],
                 max_entries: int = 4096) -> None:
        if half_life_s <= 0 or max_tokens <= 0 or max_entries <= 0:
            raise ValueError("half_life_s, max_tokens and max_entries must be positive")
        self.decay = math.log(2) / half_life_s
        self.max_tokens = max_tokens
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, block_hashes: list[int], tokens: list[int], block_size: int) -> None:
        """Count one request whose prompt starts with `tokens` and has these full-block hashes."""
        depth = min(len(block_hashes), self.max_tokens // block_size, len(tokens) // block_size)
        if depth <= 0:
            return
        now = self.clock()
        kept = tuple(tokens[:depth * block_size])
        parent = None
        for i, h in enumerate(block_hashes[:depth]):
            entry = self._entries.get(h)
            if entry is None:
                entry = self._entries[h] = _Entry(0.0, now, i + 1, (i + 1) * block_size, kept, parent)
            self._age(entry, now)
            entry.score += 1.0
            parent = h
        if len(self._entries) > self.max_entries:
            self._evict(now)

    def top(self, k: int) -> list[list[int]]:
        """Token ids of the `k` prefixes worth most, none inside another chosen one."""
        if k <= 0:
            return []
        now = self.clock()
        for entry in self._entries.values():
            self._age(entry, now)
        ranked = sorted(self._entries.items(), key=lambda kv: -kv[1].score * kv[1].depth)
        chosen: list[tuple[int, _Entry]] = []
        covered: set[int] = set()
        for h, entry in ranked:
            if h in covered or entry.score < 2.0:  # one request alone is not a shared prefix
                continue
            chosen.append((h, entry))
            covered |= self._chain(h)
            if len(chosen) == k:
                break
        return [list(e.tokens[:e.length]) for _, e in chosen]

    def _chain(self, h: int | None) -> set[int]:
        chain = set()
        while h is not None and h in self._entries and h not in chain:
            chain.add(h)
            h = self._entries[h].parent
        return chain

    def _age(self, entry: _Entry, now: float) -> None:
        entry.score *= math.exp(-self.decay * max(0.0, now - entry.stamp))
        entry.stamp = now

    def _evict(self, now: float) -> None:
        for entry in self._entries.values():
            self._age(entry, now)
        keep = sorted(self._entries, key=lambda h: -self._entries[h].score)[:self.max_entries // 2]
        self._entries = {h: self._entries[h] for h in keep}
