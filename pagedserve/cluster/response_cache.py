"""The response cache's pure parts: which requests may be cached, their key, and the L1 store.

A key is a SHA-256 over everything that decides a response: the served model's identity (its
name and a fingerprint of its config and weight files), the endpoint, the scope (the API key's
name, or everyone), every prompt's token ids after the chat template, the resolved sampling
parameters of the request (n, temperature, max_tokens after defaults, stop, logprobs, ...), and
what else the response shows of the prompts (completions' `echo` texts, `prompt_logprobs`).
Only deterministic requests are cached: temperature 0, a fixed `seed`, or `max_tokens` 0.

The L1 is each ingress replica's own LRU with a TTL; Redis (`redis_cache.py`) is the shared L2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from pagedserve.sampling_params import SamplingParams

KEY_VERSION = "v1"  # bump when the stored entry's shape changes
# Files that make up a model's identity: a redeploy with other weights, another config or
# another tokenizer never hits the old entries.
_IDENTITY_SUFFIXES = (".json", ".safetensors", ".gguf", ".jinja", ".model", ".bin")


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of the names, sizes and modification times of the model's files."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in _IDENTITY_SUFFIXES:
            stat = path.stat()
            h.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def is_deterministic(params: SamplingParams) -> bool:
    """Greedy, sampled with a fixed seed, or nothing sampled at all (`max_tokens=0`, an echo
    that scores its prompt): the same request gives the same answer."""
    return params.greedy or params.seed is not None or params.max_tokens == 0


def cache_key(model_id: str, endpoint: str, scope: str, prompts: list[list[int]],
              params: SamplingParams, shown: dict | None = None) -> str:
    """The hex key of one request (`prompts`: every prompt's token ids, in request order;
    `shown`: what the response shows of the prompts beyond them, JSON-able)."""
    fields = dataclasses.asdict(params)
    payload = json.dumps([KEY_VERSION, model_id, endpoint, scope, prompts, fields, shown],
                         separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class MemoryLRU:
    """An LRU of byte strings with a TTL: at most `max_entries` entries, each for `ttl_s`.

    An entry's age counts from when it was stored; a hit does not extend it (an L1 filled from
    L2 gets the TTL again, bounded by the entry's own expiry, see `put(expires_at=...)`).
    """

    def __init__(self, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires_at, value = item
        if self.clock() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store `value`; `ttl_s` (at most the configured TTL) for entries that are older."""
        ttl = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        if ttl <= 0:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self.clock() + ttl, value)
        self.nbytes += len(value)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.nbytes -= len(value)
