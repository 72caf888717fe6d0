"""Each call the ingress makes to a replica is a Serve request of its own.

Serve stamps a handle call with the internal id of the request being served, and its request
router finds a call waiting for a replica by that id. The prompts of one completions request
are dispatched at once; had their calls shared the request's id, the pinned router would hand
a replica to only one of them and the others would wait forever.
"""

from __future__ import annotations

import asyncio

from fake_handles import Method
from ray.serve import context as serve_context
from ray.serve._private.default_impl import (
    create_dynamic_handle_options,
    create_init_handle_options,
    get_request_metadata,
)

from pagedserve.cluster import dispatch
from pagedserve.cluster.dispatch import Dispatcher, Job, merge_streams

PARENT_ID = "ingress-request"
CLIENT_ID = "client-request"


def _serve_ids(method: str) -> tuple[str, str]:
    """(internal id, client id) that Serve gives a call of `method` made from here."""
    metadata = get_request_metadata(create_init_handle_options(),
                                    create_dynamic_handle_options(method_name=method))
    return metadata.internal_request_id, metadata.request_id


class FakeRouter:
    """Admits every request to one replica; reports none ready until `up` is set."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.admit = Method(self._admit)
        self.release = Method(self._release)
        self.num_ready_replicas = Method(self._num_ready)

    async def _admit(self, request: dict) -> str:
        await self.up.wait()
        return "replica-1"

    async def _release(self, replica_id: str, request_id: str) -> None:
        pass

    async def _num_ready(self) -> int:
        return 1 if self.up.is_set() else 0


class FakeReplicas:
    """Records the Serve ids each call would carry; `ready` starts the replica."""

    def __init__(self, router: FakeRouter) -> None:
        self.router = router
        self.calls: list[tuple[str, str, str]] = []  # (method, internal id, client id)
        self.generate = Method(self._generate)
        self.ready = Method(self._ready)

    def options(self, **_):
        return self

    def _generate(self, prompt, params, request_id, target_replica=None):
        self.calls.append(("generate", *_serve_ids("generate")))

        async def deltas():
            yield request_id

        return deltas()

    def _ready(self):
        self.calls.append(("ready", *_serve_ids("ready")))

        async def start():
            await asyncio.sleep(0.05)
            self.router.up.set()
            return True

        return start()


def _serve_completions(num_prompts: int, replica_up: bool) -> tuple[list, str]:
    """Dispatch `num_prompts` jobs at once from inside one Serve request, as the ingress does.

    Returns the calls made to the replica handle and the internal id in force afterwards.
    """

    async def main():
        serve_context._serve_request_context.set(serve_context._RequestContext(
            request_id=CLIENT_ID, _internal_request_id=PARENT_ID))
        router = FakeRouter()
        if replica_up:
            router.up.set()
        replicas = FakeReplicas(router)
        dispatcher = Dispatcher(router, replicas, 16, 1)
        jobs = [Job(f"req-{i}", [1, 2, 3], None) for i in range(num_prompts)]
        streams = [dispatcher.stream(job) for job in jobs]
        outputs = [item async for item in merge_streams(streams)]
        assert sorted(delta for _, delta in outputs) == [job.request_id for job in jobs]
        return replicas.calls, serve_context._get_serve_request_context()._internal_request_id

    return asyncio.run(asyncio.wait_for(main(), 10))


def test_the_prompts_of_one_request_reach_replicas_as_separate_serve_requests():
    calls, after = _serve_completions(num_prompts=4, replica_up=True)
    internal_ids = [internal for method, internal, _ in calls if method == "generate"]
    assert len(internal_ids) == 4
    assert len(set(internal_ids)) == 4  # Serve's router can tell the waiting calls apart
    assert PARENT_ID not in internal_ids
    assert {client for _, _, client in calls} == {CLIENT_ID}  # logs still name the request
    assert after == PARENT_ID  # the ingress request's own context is left as it was


def test_wake_up_calls_of_one_request_are_separate_serve_requests(monkeypatch):
    monkeypatch.setattr(dispatch, "WAKE_AFTER_S", 0.01)
    calls, _ = _serve_completions(num_prompts=3, replica_up=False)
    internal_ids = [internal for method, internal, _ in calls if method == "ready"]
    assert internal_ids  # every prompt waited, so each may have woken the deployment
    assert len(set(internal_ids)) == len(internal_ids)
    assert PARENT_ID not in internal_ids
