"""L1 (this ingress's memory) in front of L2 (Redis, shared), with the cache metrics."""

from __future__ import annotations

from pagedserve.cluster.gateway_metrics import GatewayMetrics
from pagedserve.cluster.redis_cache import RedisL2
from pagedserve.cluster.response_cache import MemoryLRU
from pagedserve.config import CacheConfig


class TieredCache:
    """`get(key) -> (value, "l1" | "l2") | None`; `put(key, value)` stores in both levels.

    An L1 hit touches nothing else; an L2 hit fills L1 for the entry's remaining TTL.
    """

    def __init__(self, l1: MemoryLRU, l2: RedisL2 | None, metrics: GatewayMetrics) -> None:
        self.l1 = l1
        self.l2 = l2
        self.metrics = metrics

    @classmethod
    def from_config(cls, config: CacheConfig, metrics: GatewayMetrics) -> TieredCache:
        l2 = None
        if config.redis_url is not None:
            l2 = RedisL2(config.redis_url, config.redis_timeout_s,
                         on_error=lambda: metrics.cache_error("l2"))
        return cls(MemoryLRU(config.max_entries, config.ttl_s), l2, metrics)

    async def get(self, key: str) -> tuple[bytes, str] | None:
        value = self.l1.get(key)
        if value is not None:
            self.metrics.cache_hit("l1")
            return value, "l1"
        found = await self.l2.get(key) if self.l2 is not None else None
        if found is None:
            self.metrics.cache_miss()
            return None
        value, ttl_s = found
        self._put_l1(key, value, ttl_s)
        self.metrics.cache_hit("l2")
        return value, "l2"

    async def put(self, key: str, value: bytes) -> None:
        self._put_l1(key, value)
        if self.l2 is not None:
            await self.l2.put(key, value, self.l1.ttl_s)

    def _put_l1(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.l1.put(key, value, ttl_s)
        self.metrics.cache_bytes("l1", self.l1.nbytes)
