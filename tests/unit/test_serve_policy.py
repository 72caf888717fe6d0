"""The Serve adapter of the autoscaling policy, built from the shipped configs' `args` exactly
as `build_app` builds it, and called with contexts like Serve's controller passes."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pagedserve.autoscale import serve_policy as sp
from pagedserve.cluster.app import _replica_count_options
from pagedserve.config import ClusterConfig

CONFIGS = Path(__file__).resolve().parents[2] / "ray_configs"


def shipped_args(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())["applications"][0]["args"]


def policy_from(args: dict) -> tuple[sp.ReplicaAutoscalingPolicy, dict]:
    """The policy object Serve's controller would build from the deployment options."""
    options = _replica_count_options(ClusterConfig(**args))["autoscaling_config"]
    policy = options["policy"]
    module, name = policy["policy_function"].split(":")
    assert module == sp.__name__
    return getattr(sp, name)(**policy["policy_kwargs"]), options


def context(current: int, target: int, metrics: dict | None = None, queued: float = 0.0,
            state: dict | None = None, now: float = 100.0) -> SimpleNamespace:
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=target,
                           total_queued_requests=queued, aggregated_metrics=metrics or {},
                           policy_state=state or {}, current_time=now)


def per_replica(**values: list[float]) -> dict:
    return {name: {f"r{i}": v for i, v in enumerate(vs)} for name, vs in values.items()}


@pytest.mark.parametrize("name", ["autoscale.yaml"])
def test_the_shipped_autoscale_config_scales_up_on_a_queue_and_idles_at_the_minimum(name):
    policy, options = policy_from(shipped_args(name))
    parked = ClusterConfig(**shipped_args(name)).standby.parked
    burst = per_replica(router_queue_len=[16.0], router_oldest_wait_s=[1.5], num_running=[8.0],
                        kv_usage=[0.3], parked=[0.0])
    target, state = policy(context(1 + parked, 1 + parked, burst))
    assert target == 2 + parked  # queued work that waited past the target: one more serving
    idle = per_replica(num_running=[0.0], kv_usage=[0.0], parked=[0.0])
    target, _ = policy(context(1 + parked, 1 + parked, idle))
    assert target == 1 + parked
    assert options["min_replicas"] == 1 + parked and options["max_replicas"] == 2 + parked


def test_parked_replicas_are_added_to_serve_target_and_not_counted_as_serving():
    args = {**shipped_args("autoscale.yaml"), "standby": {"parked": 1}}
    policy, options = policy_from(args)
    assert (options["min_replicas"], options["initial_replicas"], options["max_replicas"]) \
        == (2, 2, 3)
    quiet = per_replica(num_running=[1.0, 0.0], kv_usage=[0.1, 0.0], parked=[0.0, 1.0])
    target, state = policy(context(2, 2, quiet))
    assert target == 2 and state["pagedserve"]["serving_target"] == 1
    # The router un-parked the parked one for a burst: both now serve, and Serve is asked
    # for a new parked replica behind them.
    busy = per_replica(num_running=[8.0, 8.0], kv_usage=[0.5, 0.5], parked=[0.0, 0.0])
    target, state = policy(context(2, 2, busy, state=state))
    assert target == 3 and state["pagedserve"]["serving_target"] == 2


def test_a_replica_without_metrics_yet_does_not_count_as_serving():
    """At a deployment's start only some replicas have sent metrics: the silent one may be the
    parked one, and counting it as serving would raise the serving target for good."""
    args = {**shipped_args("autoscale.yaml"), "standby": {"parked": 1}}
    policy, _ = policy_from(args)
    one_reporting = per_replica(num_running=[0.0], kv_usage=[0.0], parked=[0.0])
    target, state = policy(context(2, 2, one_reporting))
    assert target == 2 and state["pagedserve"]["serving_target"] == 1


def test_a_fixed_size_deployment_in_a_rollout_is_autoscaled_and_retires_to_zero():
    """Its size stays fixed until the router tells its replicas their version lost; then 0,
    also once no replica is left to say so."""
    engine = {"model": "m", "device": "cpu"}
    config = ClusterConfig(engine=engine, num_replicas=2, rollout={"engine": engine})
    options = _replica_count_options(config)
    assert "num_replicas" not in options
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) \
        == (0, 2, 2)
    policy = getattr(sp, scaling["policy"]["policy_function"].split(":")[1])(
        **scaling["policy"]["policy_kwargs"])
    serving = per_replica(retired=[0.0, 0.0])
    target, state = policy(context(2, 2, serving))
    assert target == 2
    target, state = policy(context(2, 2, per_replica(retired=[0.0, 0.5]), state=state))
    assert target == 0
    target, _ = policy(context(0, 0, {}, state=state))  # gone: no metrics, still retired
    assert target == 0
    assert policy(context(2, 2, {}))[0] == 2  # a deployment that never lost keeps its size


def test_an_autoscaled_deployment_in_a_rollout_keeps_its_minimum_until_retired():
    args = {**shipped_args("autoscale.yaml")}
    args["rollout"] = {"engine": args.get("engine", {})}
    policy, options = policy_from(args)
    minimum = ClusterConfig(**args).autoscaling.min_replicas
    assert options["min_replicas"] == 0  # Serve's; the policy keeps the warm minimum
    idle = per_replica(num_running=[0.0], kv_usage=[0.0], parked=[0.0], retired=[0.0])
    target, state = policy(context(1, 1, idle))
    assert target == max(1, minimum)
    retiring = per_replica(num_running=[2.0], kv_usage=[0.1], parked=[0.0], retired=[1.0])
    target, state = policy(context(1, 1, retiring, state=state))
    assert target == 0
    assert policy(context(0, 0, {}, state=state))[0] == 0
