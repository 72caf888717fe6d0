"""A replica whose start failed part-way is still shut down cleanly.

Serve calls `__del__` after a failed `__init__` as well. It used to raise AttributeError on the
first attribute `__init__` had not reached, leaving the engine process and rank actors behind.
"""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.replicas.deployment import ReplicaDeployment

# Serve's shutdown hook is an async `__del__`; Python also calls it when a test's object is
# collected, which only makes a coroutine nobody awaits.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine 'ReplicaDeployment.__del__' was never awaited:RuntimeWarning")


class _Engine:
    shut_down = False

    async def shutdown(self) -> None:
        self.shut_down = True


class _Ranks:
    killed = False

    def kill(self) -> None:
        self.killed = True


def _partly_started(**attributes) -> ReplicaDeployment:
    replica = ReplicaDeployment.__new__(ReplicaDeployment)  # as far as a failing __init__ got
    for name, value in attributes.items():
        setattr(replica, name, value)
    return replica


def test_failed_warm_up_still_stops_the_engine_and_kills_the_ranks():
    engine, ranks = _Engine(), _Ranks()
    asyncio.run(_partly_started(ranks=ranks, engine=engine).__del__())  # no reporter yet
    assert engine.shut_down and ranks.killed


def test_failure_before_the_engine_started_shuts_down_without_error():
    ranks = _Ranks()
    asyncio.run(_partly_started(ranks=ranks).__del__())
    assert ranks.killed
    asyncio.run(_partly_started().__del__())
