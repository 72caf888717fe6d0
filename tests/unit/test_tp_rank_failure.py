"""Killing one rank actor of a TP=2 replica under load (CPU, gloo, Serve handles, no HTTP).

In-flight streams must end with an error rather than hang, the replica must be replaced (its
health check fails), and requests after that must succeed on the new replica.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from ray import serve
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import build_app

pytestmark = pytest.mark.slow

APP = "pagedserve-tp-failure"
LONG = {"model": "tiny", "prompt": "w5 w6 w7 w8", "max_tokens": 400, "temperature": 0,
        "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "w9 w10", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def tp_app(tiny_model_factory):
    model_dir = str(tiny_model_factory("llama-gqa-tied"))
    args = {"engine": {"model": model_dir, "device": "cpu", "tensor_parallel_size": 2,
                       "num_kvcache_blocks": 128, "max_num_seqs": 8},
            "served_model_name": "tiny", "replica_num_cpus": 1, "torch_threads": 1}
    with own_ray_cluster(num_cpus=6):
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app(args), name=APP, route_prefix=None)
        yield handle, serve.get_deployment_handle("Replica", app_name=APP)


async def _consume(handle, started: asyncio.Event) -> int:
    chunks = 0
    async for _ in handle.options(stream=True).completions.remote(LONG):
        chunks += 1
        started.set()
    return chunks


async def _replaced(replica, old_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = await replica.stats.remote()
            if stats["replica_id"] != old_id:
                return stats
        except Exception:  # the old replica is going away, the new one is starting
            pass
        await asyncio.sleep(1.0)
    raise AssertionError(f"replica {old_id} was not replaced within {timeout_s:.0f} s")


def test_killing_a_rank_fails_streams_and_replaces_the_replica(tp_app):
    handle, replica = tp_app

    async def scenario():
        before = await replica.stats.remote()
        assert len(before["rank_workers"]) == 1
        started = [asyncio.Event() for _ in range(3)]
        streams = [asyncio.create_task(_consume(handle, e)) for e in started]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        rank = ray.get_actor(before["rank_workers"][0], namespace=before["rank_namespace"])
        ray.kill(rank, no_restart=True)
        killed_at = time.monotonic()
        later = asyncio.create_task(_call(handle, SHORT))  # not started: re-routed
        outcomes = await asyncio.wait_for(
            asyncio.gather(*streams, return_exceptions=True), 60)
        failed_within_s = time.monotonic() - killed_at
        after = await _replaced(replica, before["replica_id"], 180)
        return outcomes, failed_within_s, after, await asyncio.wait_for(later, 180)

    outcomes, failed_within_s, after, later = asyncio.run(scenario())
    # 400 tokens take far longer than the kill: every stream must have ended with an error
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert any("tensor-parallel rank 1" in str(o) or "engine stopped" in str(o)
               for o in outcomes), outcomes
    assert failed_within_s < 30
    assert len(after["rank_workers"]) == 1
    assert later["choices"][0]["text"] is not None
    assert later["usage"]["completion_tokens"] == 4
    again = asyncio.run(_call(handle, SHORT))
    assert again["usage"]["completion_tokens"] == 4


async def _call(handle, body):
    return await handle.completions.remote(body)
