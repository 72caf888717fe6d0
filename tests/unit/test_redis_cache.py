"""The Redis L2 against a real redis-server: shared entries, TTL, and Redis going away and
coming back (misses within the timeout, errors counted, then hits again)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from prometheus_client import CollectorRegistry
from redis_server import RedisServer

from pagedserve.cluster.gateway_metrics import GatewayMetrics
from pagedserve.cluster.redis_cache import RedisL2
from pagedserve.cluster.response_cache import MemoryLRU
from pagedserve.cluster.tiered_cache import TieredCache


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _tiered(url: str, registry: CollectorRegistry, ttl_s: float = 60) -> TieredCache:
    metrics = GatewayMetrics(registry)
    l2 = RedisL2(url, 0.05, on_error=lambda: metrics.cache_error("l2"), retry_after_s=0.2)
    return TieredCache(MemoryLRU(100, ttl_s), l2, metrics)


def test_two_caches_share_l2_and_l2_hits_fill_l1(redis_server):
    registry = CollectorRegistry()
    first, second = _tiered(redis_server.url, registry), _tiered(redis_server.url,
                                                                 CollectorRegistry())

    async def run():
        assert await first.get("k") is None
        await first.put("k", b"answer")
        assert await first.get("k") == (b"answer", "l1")
        assert await second.get("k") == (b"answer", "l2")
        assert await second.get("k") == (b"answer", "l1")

    asyncio.run(run())
    assert _value(registry, "pagedserve_response_cache_hits_total", level="l1") == 1
    assert _value(registry, "pagedserve_response_cache_misses_total") == 1
    assert _value(registry, "pagedserve_response_cache_bytes", level="l1") == len(b"answer")


def test_l2_entries_expire(redis_server):
    cache = _tiered(redis_server.url, CollectorRegistry(), ttl_s=0.3)
    other = _tiered(redis_server.url, CollectorRegistry(), ttl_s=0.3)

    async def run():
        await cache.put("t", b"v")
        await asyncio.sleep(0.4)
        assert await cache.get("t") is None and await other.get("t") is None

    asyncio.run(run())


def test_redis_stopped_then_started_again(redis_server):
    registry = CollectorRegistry()
    cache = _tiered(redis_server.url, registry)

    async def run():
        await cache.put("a", b"1")
        redis_server.stop()
        start = time.monotonic()
        assert await cache.get("fresh") is None  # a miss, not an exception
        await cache.put("b", b"2")  # dropped; L1 still has it
        assert time.monotonic() - start < 0.5
        errors = _value(registry, "pagedserve_response_cache_errors_total", level="l2")
        assert errors >= 1
        redis_server.start()
        await asyncio.sleep(0.3)  # past the retry pause
        await cache.put("c", b"3")
        other = _tiered(redis_server.url, CollectorRegistry())
        assert await other.get("c") == (b"3", "l2")

    asyncio.run(run())


def test_a_redis_that_never_answers_is_a_miss_within_the_timeout():
    registry = CollectorRegistry()
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cache = _tiered(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", registry)

        async def run():
            start = time.monotonic()
            assert await cache.get("k") is None
            await cache.put("k", b"v")  # within the pause after the error: not even tried
            return time.monotonic() - start

        assert asyncio.run(run()) < 0.5
    assert _value(registry, "pagedserve_response_cache_errors_total", level="l2") == 1
    assert cache.l1.get("k") == b"v"
