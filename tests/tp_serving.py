"""A served tensor-parallel app, and killing one of its rank actors under load.

Shared by the CPU test (gloo, tests/unit/test_tp_rank_failure.py) and the GPU one (NCCL, two
GPUs, tests/gpu/test_tp_serving_gpu.py): the scenario and what it must show are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from ray import serve
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import build_app


@contextlib.contextmanager
def served_app(args: dict, app_name: str, num_cpus: int) -> Iterator[tuple]:
    """(ingress handle, replica handle) of `build_app(args)` on a fresh local cluster, no HTTP."""
    with own_ray_cluster(num_cpus=num_cpus):
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app(args), name=app_name, route_prefix=None)
        yield handle, serve.get_deployment_handle("Replica", app_name=app_name)


@dataclass
class RankKill:
    outcomes: list  # of the streams running when the rank was killed
    failed_within_s: float  # from the kill until every one of them had ended
    after: dict  # stats of the replica that replaced the killed one
    started_later: dict  # a request sent right after the kill, before any replacement
    again: dict  # a request once the new replica is up


def kill_a_rank_under_load(handle, replica, long_body: dict, short_body: dict,
                           streams: int = 3, replace_timeout_s: float = 180) -> RankKill:
    """Start `streams` long streams, kill rank 1 once each has a token, send one more request."""

    async def scenario() -> RankKill:
        before = await replica.stats.remote()
        assert len(before["rank_workers"]) == 1
        started = [asyncio.Event() for _ in range(streams)]
        running = [asyncio.create_task(_consume(handle, long_body, e)) for e in started]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        rank = ray.get_actor(before["rank_workers"][0], namespace=before["rank_namespace"])
        ray.kill(rank, no_restart=True)
        killed_at = time.monotonic()
        later = asyncio.create_task(_call(handle, short_body))  # not started: re-routed
        outcomes = await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 60)
        failed_within_s = time.monotonic() - killed_at
        after = await _replaced(replica, before["replica_id"], replace_timeout_s)
        started_later = await asyncio.wait_for(later, replace_timeout_s)
        again = await handle.completions.remote(short_body)
        return RankKill(outcomes, failed_within_s, after, started_later, again)

    return asyncio.run(scenario())


def check_rank_kill(result: RankKill, short_tokens: int) -> None:
    """Streams ended with an error naming the cause, quickly; the replica was replaced; the
    request sent after the kill and one after the replacement both succeeded."""
    assert all(isinstance(o, Exception) for o in result.outcomes), result.outcomes
    assert any("tensor-parallel rank 1" in str(o) or "engine stopped" in str(o)
               for o in result.outcomes), result.outcomes
    assert result.failed_within_s < 30
    assert len(result.after["rank_workers"]) == 1
    for response in (result.started_later, result.again):
        assert response["choices"][0]["text"] is not None
        assert response["usage"]["completion_tokens"] == short_tokens


async def _call(handle, body: dict) -> dict:
    return await handle.completions.remote(body)


async def _consume(handle, body: dict, started: asyncio.Event) -> int:
    chunks = 0
    async for _ in handle.options(stream=True).completions.remote(body):
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
