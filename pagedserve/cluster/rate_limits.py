"""Per-key rate limits: token buckets for requests and for tokens.

A bucket holds up to a minute's budget and refills continuously. Every authenticated request
takes one from the key's request bucket; a generation reserves `prompt + max_tokens` from its
token bucket at admission and gives back what it did not use when it ends.

With `redis_url` each check is one atomic Lua script in Redis (its clock, not the ingress's), so
every ingress replica on every node draws from one budget. Request tokens are drawn in leases
of `LEASE_FRACTION` of the limit (at least 1): an ingress answers most requests without a Redis
round trip, and every request it admits was still taken from the shared bucket, so all ingresses
together never admit more than the limit; at most a lease per ingress sits drawn but unused.
Without Redis, or while it does not answer within its timeout, each ingress replica checks its
own buckets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.cluster.api_keys import ApiKey
from pagedserve.cluster.openai_errors import APIError

logger = logging.getLogger(__name__)

REDIS_PREFIX = "pagedserve:ratelimit:"
LEASE_FRACTION = 0.02  # of a key's requests_per_min, drawn from Redis at once
# KEYS[1]: the bucket; ARGV: capacity, refill per second, cost (negative: give back), and the
# least of the cost to take (a lease takes what is there, from this much up to the cost).
# Returns {taken, seconds to wait before the least fits} as strings (Lua numbers would come
# back truncated to integers).
TAKE_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local least = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local taken = 0
local wait = 0
if least <= tokens then
  taken = math.min(cost, math.max(least, math.floor(tokens)))
  tokens = math.min(capacity, tokens - taken)
else
  wait = (least - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {tostring(taken), tostring(wait)}
"""


@dataclass
class TokenBucket:
    """`take(cost)` → 0.0 when taken, else the seconds until it would fit."""

    per_min: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.per_min
        self.updated = self.clock()

    def take(self, cost: float) -> float:
        now = self.clock()
        rate = self.per_min / 60
        self.tokens = min(self.per_min, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if cost <= self.tokens:
            self.tokens = min(self.per_min, self.tokens - cost)
            return 0.0
        return (cost - self.tokens) / rate


class RateLimiter:
    """`admit(key)` (one request), `reserve(key, tokens)` and `refund(key, tokens)`.

    `admit` and `reserve` raise APIError 429 with `retry_after` when the bucket is short.
    """

    def __init__(self, redis_url: str | None = None, timeout_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.timeout_s = timeout_s
        self._local: dict[tuple[str, str], TokenBucket] = {}
        self._leases: dict[str, float] = {}  # request tokens drawn from Redis, not yet used
        self._redis = None
        self._script = None
        if redis_url is not None:
            from pagedserve.cluster.redis_cache import redis_client

            self._redis = redis_client(redis_url, timeout_s)
            self._script = self._redis.register_script(TAKE_SCRIPT)
        self._redis_down_until = 0.0

    async def admit(self, key: ApiKey) -> None:
        limit = key.rate_limit.requests_per_min
        if limit is None:
            return
        if self._leases.get(key.name, 0) >= 1:
            self._leases[key.name] -= 1
            return
        lease = max(1, int(limit * LEASE_FRACTION)) if self._script is not None else 1
        taken, wait = await self._take(key.name, "requests", limit, lease, least=1)
        if taken < 1:
            raise APIError.rate_limited(
                f"Rate limit of {limit:g} requests per minute reached for key '{key.name}'.",
                retry_after=wait)
        self._leases[key.name] = taken - 1

    async def reserve(self, key: ApiKey, tokens: int) -> None:
        limit = key.rate_limit.tokens_per_min
        if limit is None or tokens <= 0:
            return
        if tokens > limit:
            raise APIError.rate_limited(
                f"This request needs {tokens} tokens (prompt + max_tokens); key '{key.name}' "
                f"allows {limit:g} tokens per minute. Lower max_tokens.")
        _, wait = await self._take(key.name, "tokens", limit, tokens)
        if wait > 0:
            raise APIError.rate_limited(
                f"Rate limit of {limit:g} tokens per minute reached for key '{key.name}'.",
                retry_after=wait)

    async def refund(self, key: ApiKey, tokens: int) -> None:
        limit = key.rate_limit.tokens_per_min
        if limit is not None and tokens > 0:
            await self._take(key.name, "tokens", limit, -tokens)

    async def _take(self, name: str, kind: str, per_min: float, cost: float,
                    least: float | None = None) -> tuple[float, float]:
        """(taken, seconds to wait): `cost` taken whole, or with `least` as much of it as is
        there (at least `least`); nothing taken and the wait for `least` when short."""
        least = cost if least is None else least
        if self._script is not None and self.clock() >= self._redis_down_until:
            try:
                taken, wait = await asyncio.wait_for(
                    self._script(keys=[f"{REDIS_PREFIX}{name}:{kind}"],
                                 args=[per_min, per_min / 60, cost, least]),
                    self.timeout_s * 2)
                return float(taken), float(wait)
            except Exception as err:  # then this ingress's own bucket decides
                self._redis_down_until = self.clock() + 1.0
                logger.warning("rate limits: Redis unavailable (%s); using this ingress's "
                               "own buckets for 1 s", type(err).__name__)
        bucket = self._local.get((name, kind))
        if bucket is None:
            bucket = self._local[(name, kind)] = TokenBucket(per_min, self.clock)
        wait = bucket.take(least)
        return (least if wait == 0 else 0.0), wait
