"""The response cache's L2: Redis, shared by every ingress replica on every node.

Every call is bounded (`timeout_s` on the socket and around the call) and never raises: a Redis
that is down or slow makes a lookup a miss and a store a no-op, counted by `on_error`. After a
failure the cache leaves Redis alone for `retry_after_s`, so a dead Redis costs each request
nothing; then it tries again, and caching resumes by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

KEY_PREFIX = "pagedserve:cache:"


def redis_client(url: str, timeout_s: float):
    """An asyncio redis-py client with bounded connect and socket timeouts and no retries
    (a retry would multiply the bound)."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


class RedisL2:
    """`get(key) -> (value, remaining ttl_s) | None` and `put(key, value, ttl_s)` on Redis."""

    def __init__(self, url: str, timeout_s: float, on_error: Callable[[], None],
                 retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 client=None) -> None:
        self.client = client if client is not None else redis_client(url, timeout_s)
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._down_until = 0.0

    async def get(self, key: str) -> tuple[bytes, float] | None:
        async def lookup():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(KEY_PREFIX + key)
                pipe.pttl(KEY_PREFIX + key)
                return await pipe.execute()

        found = await self._call(lookup)
        if not found or found[0] is None:
            return None
        value, ttl_ms = found
        return value, (ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else 0.0)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._call(lambda: self.client.set(KEY_PREFIX + key, value,
                                                 px=max(1, int(ttl_s * 1000))))

    async def _call(self, make_call):
        if self.clock() < self._down_until:
            return None
        try:
            return await asyncio.wait_for(make_call(), self.timeout_s * 2)
        except Exception as err:  # any Redis trouble is a miss, never a failed request
            self._down_until = self.clock() + self.retry_after_s
            self.on_error()
            logger.warning("response cache: Redis unavailable (%s); serving without L2 for "
                           "%.1f s", type(err).__name__, self.retry_after_s)
            return None
