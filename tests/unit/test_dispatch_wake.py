"""With no replica running (min_replicas: 0), a waiting admission wakes the deployment."""

from __future__ import annotations

import asyncio

from fake_handles import Method

from pagedserve.cluster import dispatch
from pagedserve.cluster.dispatch import Dispatcher


class FakeRouter:
    """Admits once a replica has started; counts ready replicas."""

    def __init__(self) -> None:
        self.replica_up = asyncio.Event()
        self.admit = Method(self._admit)
        self.num_ready_replicas = Method(self._num_ready)

    async def _admit(self, request: dict) -> str:
        await self.replica_up.wait()
        return "replica-1"

    async def _num_ready(self) -> int:
        return 1 if self.replica_up.is_set() else 0


class FakeReplicas:
    """A replica handle whose queued `ready` call makes the autoscaler start a replica."""

    def __init__(self, router: FakeRouter) -> None:
        self.router, self.woken = router, 0
        self.ready = Method(self._ready)

    def options(self, **_):
        return self

    async def _ready(self) -> bool:
        self.woken += 1
        await asyncio.sleep(0.05)  # the replica starts
        self.router.replica_up.set()
        return True


def test_waiting_with_no_replica_wakes_one_and_is_admitted(monkeypatch):
    monkeypatch.setattr(dispatch, "WAKE_AFTER_S", 0.05)

    async def main():
        router = FakeRouter()
        replicas = FakeReplicas(router)
        chosen = await Dispatcher(router, replicas, 16, 1)._admit(
            dispatch.Job("r", [1, 2, 3], None), set())
        return chosen, replicas.woken

    assert asyncio.run(main()) == ("replica-1", 1)


def test_a_quick_admission_wakes_nobody(monkeypatch):
    monkeypatch.setattr(dispatch, "WAKE_AFTER_S", 0.5)

    async def main():
        router = FakeRouter()
        router.replica_up.set()
        replicas = FakeReplicas(router)
        chosen = await Dispatcher(router, replicas, 16, 1)._admit(
            dispatch.Job("r", [1, 2, 3], None), set())
        return chosen, replicas.woken

    assert asyncio.run(main()) == ("replica-1", 0)


def test_a_wake_that_never_returns_does_not_hold_the_admission(monkeypatch):
    """The handle woken may be a deployment that will never start again (a rollout's loser
    at 0 replicas): a replica of the other version admits the request meanwhile."""
    monkeypatch.setattr(dispatch, "WAKE_AFTER_S", 0.05)

    async def main():
        router = FakeRouter()
        replicas = FakeReplicas(router)
        woken = asyncio.Event()

        async def never_ready() -> bool:
            woken.set()
            await asyncio.Event().wait()

        replicas.ready = Method(never_ready)

        async def other_version_starts():
            await woken.wait()
            router.replica_up.set()

        starter = asyncio.create_task(other_version_starts())
        chosen = await asyncio.wait_for(Dispatcher(router, replicas, 16, 1)._admit(
            dispatch.Job("r", [1, 2, 3], None), set()), timeout=5)
        await starter
        return chosen

    assert asyncio.run(main()) == "replica-1"
