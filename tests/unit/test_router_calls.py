"""Router calls across a router restart: admission is submitted again, notices are dropped,
the router's own errors and a router that never comes back are not hidden."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from pagedserve.cluster import router_calls
from pagedserve.cluster.admission import QueueFullError
from pagedserve.cluster.router_calls import call_router, tell_router


class FlakyMethod:
    """A handle method whose first `failures` calls find the router dead."""

    def __init__(self, failures: int, error: Exception | None = None,
                 replaced: int = 0) -> None:
        """`replaced`: the next calls after those are answered by a router being replaced."""
        self.failures, self.error, self.replaced, self.calls = failures, error, replaced, []

    def remote(self, *args):
        self.calls.append(args)

        async def answer():
            if len(self.calls) <= self.failures:
                raise ActorDiedError()
            if len(self.calls) <= self.failures + self.replaced:
                return router_calls.ROUTER_REPLACED
            if self.error is not None:
                raise self.error
            return "replica-1"
        return answer()


@pytest.fixture(autouse=True)
def no_waits(monkeypatch):
    monkeypatch.setattr(router_calls, "RETRY_DELAYS_S", (0.0,))


def test_admission_is_submitted_again_to_the_new_router():
    method = FlakyMethod(failures=3)
    assert asyncio.run(call_router(method, {"request_id": "r"})) == "replica-1"
    assert method.calls == [({"request_id": "r"},)] * 4


def test_a_router_being_replaced_has_the_admission_submitted_to_its_successor():
    method = FlakyMethod(failures=1, replaced=2)
    assert asyncio.run(call_router(method, {"request_id": "r"})) == "replica-1"
    assert len(method.calls) == 4


def test_a_replaced_router_without_successor_is_an_error_after_the_wait():
    method = FlakyMethod(failures=0, replaced=10**9)
    with pytest.raises(RuntimeError, match="replaced"):
        asyncio.run(call_router(method, {}, wait_s=0.05))


def test_the_routers_own_error_is_not_retried():
    method = FlakyMethod(failures=0, error=QueueFullError("full"))
    with pytest.raises(QueueFullError):
        asyncio.run(call_router(method, {}))
    assert len(method.calls) == 1


def test_a_router_that_stays_gone_is_an_error_after_the_wait():
    method = FlakyMethod(failures=10**9)
    with pytest.raises(ActorDiedError):
        asyncio.run(call_router(method, {}, wait_s=0.05))


def test_a_notice_to_a_dead_router_is_dropped():
    method = FlakyMethod(failures=1)
    assert asyncio.run(tell_router(method, "replica-1", "r")) is None
    assert len(method.calls) == 1
