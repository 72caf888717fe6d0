"""Rolling a second model version in at a 20 % canary share, under load, on a real local Ray
cluster and Serve (handles only, no HTTP port).

- healthy: the new version (other weights: another seed) is promoted after `window_s`; from
  then on every request goes to it, the old replica drains and stops (its deployment ends with
  no replica), and no request failed.
  The router is then killed: the one Serve starts learns the decision from the new version's
  replicas (they keep it) instead of judging the rollout again, and no request fails.
- failing: the new version's config breaks its requests (a context window shorter than the
  prompts); it is rolled back within `window_s`, the old version serves everything again and
  the new version's deployment ends with no replica.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from fault_load import Load, with_load
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import CANARY_DEPLOYMENT, REPLICA_DEPLOYMENT, build_app

pytestmark = pytest.mark.slow

BODY = {"model": "tiny", "prompt": "w5 w6 w7 w8 w9", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}
WINDOW_S = 8.0
CONCURRENCY = 3
ROLLOUT = {"canary_share": 0.2, "max_error_rate": 0.03, "window_s": WINDOW_S, "min_requests": 5}
RETIRE_WITHIN_S = 30.0  # the loser's flag reaches Serve's policy, its streams end, it stops


def _engine(model, **extra) -> dict:
    return {"model": str(model), "device": "cpu", "dtype": "float32", "num_kvcache_blocks": 64,
            "max_num_seqs": 4, **extra}


@pytest.fixture(scope="module")
def cluster():
    with own_ray_cluster(num_cpus=4):
        serve.start(proxy_location="Disabled")
        yield


def _deploy(name: str, stable: dict, canary: dict) -> None:
    args = {"engine": stable, "served_model_name": "tiny", "replica_num_cpus": 1,
            "torch_threads": 1, "rollout": {"engine": canary, **ROLLOUT}}
    serve.run(build_app(args), name=name, route_prefix=None)


def _rollout_state(name: str) -> dict:
    return serve.get_deployment_handle("Router", name).stats.remote().result()["rollout"]


def _replica_states(name: str, deployment: str) -> dict[str, int]:
    """How many replicas of the deployment Serve has in each state (RUNNING, STOPPING...)."""
    return dict(serve.status().applications[name].deployments[deployment].replica_states)


async def _run_until_retired(name: str, loser: str,
                             seconds_after: float) -> tuple[Load, float, dict, float]:
    """Load until the rollout decides and the loser's deployment has no replica left, then
    `seconds_after` more; returns the load, when the decision was seen, the rollout's counts
    then, and how long after it the loser's last replica was gone."""
    load = Load(serve.get_app_handle(name), BODY, concurrency=CONCURRENCY)
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    deadline = time.monotonic() + 4 * WINDOW_S + 60
    while (at_decision := await asyncio.to_thread(_rollout_state, name))["state"] == "canary":
        assert time.monotonic() < deadline, "the rollout never decided"
        await asyncio.sleep(0.2)
    decided_at = time.monotonic()
    while states := await asyncio.to_thread(_replica_states, name, loser):
        assert time.monotonic() - decided_at < RETIRE_WITHIN_S, f"{loser} still has {states}"
        await asyncio.sleep(0.2)
    retired_after_s = time.monotonic() - decided_at
    await asyncio.sleep(seconds_after)
    stop.set()
    await asyncio.wait_for(running, 120)
    return load, decided_at, at_decision, retired_after_s


def _kill_router(name: str) -> str:
    """Kill the router's replica (Serve starts another); returns the killed one's id."""
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    (router,) = ray.get(controller.get_deployment_details.remote(name, "Router")).replicas
    ray.kill(ray.get_actor(router.actor_name, namespace=SERVE_NAMESPACE), no_restart=True)
    return router.replica_id


def _router_replicas(name: str) -> dict:
    return serve.get_deployment_handle("Router", name).stats.remote().result()["replicas"]


def test_healthy_version_is_promoted_and_the_old_one_drains(cluster, tiny_model_factory):
    model = tiny_model_factory("llama-gqa-tied")
    other_weights = tiny_model_factory("llama-gqa-tied-long")  # same tokenizer, other weights
    _deploy("rollout-healthy", _engine(model), _engine(other_weights))
    load, _, at_decision, retired_after_s = asyncio.run(
        _run_until_retired("rollout-healthy", REPLICA_DEPLOYMENT, seconds_after=2))
    rollout = _rollout_state("rollout-healthy")
    assert rollout["state"] == "promoted" and rollout["reason"] == "healthy", rollout
    assert rollout["decided_after_s"] >= WINDOW_S
    counts = load.counts()
    assert counts["sent"] > 0 and counts["succeeded"] == counts["sent"], (counts, load.failed())
    # While judged, a fifth of the requests went to the new version.
    judged = at_decision["stable"]["requests"] + at_decision["canary"]["requests"]
    assert abs(at_decision["canary"]["requests"] / judged - 0.2) < 0.07, at_decision
    # Then the old one drained: it only finished what it had running at the decision.
    assert rollout["stable"]["requests"] - at_decision["stable"]["requests"] <= CONCURRENCY
    assert rollout["canary"]["requests"] > at_decision["canary"]["requests"] + CONCURRENCY
    # The old deployment stopped its replica, which the router forgot; the new one serves on.
    assert _replica_states("rollout-healthy", CANARY_DEPLOYMENT) == {"RUNNING": 1}
    router = _router_replicas("rollout-healthy")
    assert [r["version"] for r in router.values()] == ["canary"], router
    assert all(r["num_running"] == 0 for r in router.values()), router
    print(f"old version's replica gone {retired_after_s:.1f} s after the promotion")
    # A new router takes the promotion from the new version's replica; had it judged the
    # rollout again, four in five requests would wait for the old version, which is gone.
    after_restart = Load(serve.get_app_handle("rollout-healthy"), BODY, concurrency=CONCURRENCY)
    asyncio.run(with_load(after_restart, lambda: _kill_router("rollout-healthy"), settle_s=10))
    counts = after_restart.counts()
    assert counts["sent"] > CONCURRENCY and counts["succeeded"] == counts["sent"], \
        (counts, after_restart.failed()[:3])
    rollout = _rollout_state("rollout-healthy")
    assert (rollout["state"], rollout["reason"]) == ("promoted", "adopted"), rollout
    assert rollout["canary"]["requests"] > 0 and rollout["stable"]["requests"] == 0, rollout
    assert _replica_states("rollout-healthy", REPLICA_DEPLOYMENT) == {}
    serve.delete("rollout-healthy")


def test_failing_version_is_rolled_back_within_the_window(cluster, tiny_model_factory):
    model = tiny_model_factory("llama-gqa-tied")
    # Its context window is shorter than the prompts: every request it gets fails.
    _deploy("rollout-failing", _engine(model), _engine(model, max_model_len=4))
    load, decided_at, _, retired_after_s = asyncio.run(
        _run_until_retired("rollout-failing", CANARY_DEPLOYMENT, seconds_after=2))
    rollout = _rollout_state("rollout-failing")
    assert rollout["state"] == "rolled_back" and rollout["reason"] == "error_rate", rollout
    assert rollout["decided_after_s"] < WINDOW_S, rollout
    assert rollout["canary"]["errors"] >= ROLLOUT["min_requests"]
    # Only the new version's requests failed, all before the decision; after it, the old
    # version serves everything.
    assert all(o.ended_at <= decided_at + 1.0 for o in load.failed())
    after = load.counts(since=decided_at + 1.0)
    assert after["sent"] > 0 and after["succeeded"] == after["sent"], after
    assert len(load.failed()) == rollout["canary"]["errors"], (rollout, load.counts())
    # The new version's deployment stopped its replica; the old one serves on.
    assert _replica_states("rollout-failing", REPLICA_DEPLOYMENT) == {"RUNNING": 1}
    router = _router_replicas("rollout-failing")
    assert [r["version"] for r in router.values()] == ["stable"], router
    print(f"new version's replica gone {retired_after_s:.1f} s after the roll-back")
    serve.delete("rollout-failing")
