"""`router.policy: serve`: the ingress skips our router's admission and Serve's default request
router places each call; what needs our admission is refused with the reason."""

from __future__ import annotations

import asyncio

import pytest
from fake_handles import Method
from pydantic import ValidationError
from ray.exceptions import ActorDiedError

from pagedserve.cluster.app import build_app
from pagedserve.cluster.dispatch import Dispatcher, Job
from pagedserve.cluster.router import RouterDeployment
from pagedserve.config import ClusterConfig, RouterConfig

SERVE = {"router": {"policy": "serve"}}
DEFAULT_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"


def test_admission_is_the_default_and_serve_is_accepted():
    assert RouterConfig().policy == "admission"
    assert ClusterConfig(**SERVE, num_replicas=2).router.policy == "serve"


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValidationError, match="policy"):
        RouterConfig(policy="round_robin")


@pytest.mark.parametrize(("extra", "named"), [
    ({"autoscaling": {}}, "autoscaling"),
    ({"rollout": {"engine": {}}}, "rollout"),
    ({"standby": {"parked": 1}}, "standby.parked"),
])
def test_what_needs_our_admission_is_refused_under_serve(extra, named):
    with pytest.raises(ValidationError, match=f"needs our router's admission.*{named}"):
        ClusterConfig(**SERVE, **extra)


def _replica_router_class(args: dict) -> str:
    ingress = build_app(args)._bound_deployment  # noqa: SLF001
    (replicas,) = [a._bound_deployment for a in ingress.init_args  # noqa: SLF001
                   if getattr(a, "_bound_deployment", None) is not None
                   and a._bound_deployment.name == "Replica"]  # noqa: SLF001
    return replicas._deployment_config.request_router_config.request_router_class  # noqa: SLF001


def test_the_replicas_get_serves_default_request_router_under_serve():
    assert _replica_router_class(SERVE) == DEFAULT_ROUTER
    assert _replica_router_class({}).endswith("PinnedRequestRouter")


class CountingRouter:
    """Counts every call the dispatcher makes to the router actor."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        for name in ("admit", "release", "replica_failed", "num_ready_replicas"):
            setattr(self, name, Method(self._counted(name)))

    def _counted(self, name: str):
        async def call(*_args):
            self.calls.append(name)
            return "replica-1"
        return call


class Replicas:
    """Streams three deltas per call and records each call's keyword arguments; the first
    `failures` calls fail before streaming, as a replica that died would."""

    def __init__(self, failures: int = 0) -> None:
        self.kwargs: list[dict] = []
        self.failures = failures
        self.generate = Method(self._generate)

    def options(self, **_):
        return self

    def _generate(self, prompt, params, request_id, **kwargs):
        self.kwargs.append(kwargs)
        failing = len(self.kwargs) <= self.failures

        async def deltas():
            if failing:
                raise ActorDiedError()
            for i in range(3):
                yield f"{request_id}:{i}"

        return Stream(deltas())


class Stream:
    """An async iterator with the `cancel()` of a Serve streaming response."""

    def __init__(self, deltas) -> None:
        self.deltas = deltas

    def __aiter__(self):
        return self.deltas

    def cancel(self) -> None:
        pass


def _run(dispatcher: Dispatcher) -> list[str]:
    async def main():
        return [d async for d in dispatcher.stream(Job("req", [1, 2, 3], None))]
    return asyncio.run(asyncio.wait_for(main(), 10))


def test_without_admission_the_call_streams_unpinned_and_the_router_is_not_asked():
    router, replicas = CountingRouter(), Replicas()
    deltas = _run(Dispatcher(router, replicas, 16, 1, admission=False))
    assert deltas == ["req:0", "req:1", "req:2"]
    assert replicas.kwargs == [{}]  # no target_replica: Serve's router picks
    assert router.calls == []


def test_with_admission_the_call_is_pinned_to_the_admitted_replica():
    router, replicas = CountingRouter(), Replicas()
    assert _run(Dispatcher(router, replicas, 16, 1)) == ["req:0", "req:1", "req:2"]
    assert replicas.kwargs == [{"target_replica": "replica-1"}]
    assert router.calls == ["admit"]


def test_without_admission_a_call_whose_replica_died_is_sent_again_unpinned():
    router, replicas = CountingRouter(), Replicas(failures=1)
    assert _run(Dispatcher(router, replicas, 16, 1, admission=False))[-1] == "req-retry1:2"
    assert replicas.kwargs == [{}, {}]
    assert router.calls == []


def test_the_router_shows_each_replicas_prefix_cache_totals():
    async def scenario():
        router = RouterDeployment()
        await router.report({"replica_id": "A", "max_num_seqs": 2, "num_running": 0,
                             "num_waiting": 0, "num_free_blocks": 10, "num_total_blocks": 10,
                             "block_size": 16, "num_prefix_queried_tokens": 640,
                             "num_prefix_hit_tokens": 512})
        return router.stats()["replicas"]["A"]

    stats = asyncio.run(scenario())
    assert (stats["prefix_queried_tokens"], stats["prefix_hit_tokens"]) == (640, 512)
