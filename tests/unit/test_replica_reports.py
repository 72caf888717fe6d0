"""A replica's capacity report counts every request whose id it confirms to the router.

The router frees a request's reserved slot when the replica confirms receiving it, so a report
whose counters predate a request it confirms shows a free slot that is taken. Such a report
(counters read before awaiting the prefix summary, ids after) let the router send a request to
a full replica, where it waited behind two long ones.
"""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.config import ClusterConfig
from pagedserve.replicas.deployment import ReplicaDeployment
from pagedserve.replicas.engine.engine_stats import EngineStats


class _Engine:
    """Counts requests; a request arrives while the replica awaits its prefix summary."""

    def __init__(self, replica: ReplicaDeployment) -> None:
        self.replica, self.num_waiting = replica, 0

    def stats_nowait(self) -> EngineStats:
        return EngineStats(num_running=1, num_waiting=self.num_waiting, num_free_blocks=100,
                           num_total_blocks=200, prefix_cache_hit_rate=0.0, num_preemptions=0,
                           num_prefix_hit_tokens=32, num_prefix_queried_tokens=40)

    async def cached_block_hashes(self) -> list[int]:
        await asyncio.sleep(0)
        self.num_waiting += 1  # as `generate` does once the engine holds the request
        self.replica._received.append(f"request-{self.num_waiting}")
        return [7]


class _Router:
    def __init__(self, fail: bool = False) -> None:
        self.reports: list[dict] = []
        self.fail = fail
        self.report = self  # `router.report.remote(...)`, as on a Serve handle

    async def remote(self, report: dict) -> dict:
        if self.fail:
            raise ConnectionError("router restarting")
        self.reports.append(report)
        return {"queue_len": 0, "oldest_wait_s": 0.0}


class _Replica(ReplicaDeployment):
    def __del__(self) -> None:
        """Serve awaits the real (async) one; collecting a test's object must not call it."""


def _replica(router: _Router) -> ReplicaDeployment:
    replica = _Replica.__new__(_Replica)
    replica.config, replica.replica_id, replica.draining = ClusterConfig(), "r", False
    replica.router, replica._received, replica.rollout = router, [], None
    replica.engine = _Engine(replica)
    return replica


def test_a_request_confirmed_in_a_report_is_counted_in_it():
    router = _Router()
    asyncio.run(_replica(router)._push_report(include_hashes=True))
    (report,) = router.reports
    assert report["received_ids"] == ["request-1"]
    assert report["num_waiting"] == 1  # the confirmed request holds a slot
    assert report["block_hashes"] == [7]
    assert (report["num_prefix_queried_tokens"], report["num_prefix_hit_tokens"]) == (40, 32)


def test_ids_of_a_failed_report_go_with_the_next_one():
    router = _Router(fail=True)
    replica = _replica(router)
    with pytest.raises(ConnectionError):
        asyncio.run(replica._push_report(include_hashes=True))
    router.fail = False
    asyncio.run(replica._push_report(include_hashes=True))
    (report,) = router.reports
    assert report["received_ids"] == ["request-1", "request-2"]
    assert report["num_waiting"] == 2
