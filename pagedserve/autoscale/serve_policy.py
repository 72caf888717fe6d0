"""Serve's custom autoscaling hook for the replica deployment, around the pure `policy.decide`.

Serve constructs `ReplicaAutoscalingPolicy(**policy_kwargs)` once in its controller and calls it
every control-loop tick with an `AutoscalingContext`. The signals come from the replicas'
`record_autoscaling_stats` (averaged by Serve over `look_back_period_s`); each replica also relays
the router queue's depth and oldest wait, which it learns with every capacity report.

While a rollout runs, both model versions' deployments are autoscaled, fixed-size ones too
(`FixedUntilRetired`): once the router tells a version's replicas that it lost the rollout,
their policy asks Serve for 0 replicas, which stops them after their streams end (Serve's
graceful shutdown), so the cluster stops paying for the loser. Serve's own minimum is then 0;
the policies keep the warm minimum themselves.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from pagedserve.autoscale.policy import PolicyState, Signals, decide, scale_reason
from pagedserve.config import AutoscaleConfig
from pagedserve.metric_list import serve_metric

# Serve's own logger: its INFO lines reach the replica and controller log files (ours would
# stop at the root logger's WARNING level).
logger = logging.getLogger("ray.serve")

# Names of the values a replica returns from `record_autoscaling_stats`.
KV_USAGE = "kv_usage"
NUM_RUNNING = "num_running"
NUM_WAITING = "num_waiting"
ROUTER_QUEUE_LEN = "router_queue_len"
ROUTER_OLDEST_WAIT_S = "router_oldest_wait_s"
RECENT_TTFT_S = "recent_ttft_s"
PARKED = "parked"  # 1 while the router keeps the replica parked
RETIRED = "retired"  # 1 once the router said this replica's model version lost a rollout

_STATE_KEY = "pagedserve"
_RETIRED_KEY = "retired"


def retired(ctx) -> bool:
    """Whether the deployment's version lost a rollout: for good once a replica said so (a
    deployment at 0 replicas sends no metrics)."""
    if (ctx.policy_state or {}).get(_RETIRED_KEY):
        return True
    reported = ((ctx.aggregated_metrics or {}).get(RETIRED) or {}).values()
    return any(float(v) > 0 for v in reported)


def _retire(ctx) -> tuple[int, dict] | None:
    """`(0 replicas, state)` once the deployment's version lost a rollout, else None."""
    if not retired(ctx):
        return None
    state = dict(ctx.policy_state or {})
    if not state.get(_RETIRED_KEY):
        logger.info("rollout: this model version lost; its %d replicas drain and stop",
                    int(ctx.current_num_replicas))
    return 0, {**state, _RETIRED_KEY: True}


class FixedUntilRetired:
    """Callable Serve policy of a fixed-size deployment in a rollout: `num_replicas`, and 0
    once its model version lost the rollout."""

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas

    def __call__(self, ctx) -> tuple[int, dict]:
        return _retire(ctx) or (self.num_replicas, dict(ctx.policy_state or {}))


class ReplicaAutoscalingPolicy:
    """Callable Serve policy: `(AutoscalingContext) -> (replicas, policy_state)`."""

    def __init__(self, running_per_replica: int, parked: int = 0, **autoscale: object) -> None:
        """`parked`: replicas kept beyond the serving ones (the router un-parks them)."""
        self.config = AutoscaleConfig(**autoscale)
        self.running_per_replica = self.config.running_per_replica or running_per_replica
        self.parked = parked
        self._scale_events = serve_metric("scale_events")  # recorded in Serve's controller

    def __call__(self, ctx) -> tuple[int, dict]:
        """Decide the serving replicas; ask Serve for those plus the parked ones (none once
        this deployment's model version lost a rollout)."""
        if (decision := _retire(ctx)) is not None:
            return decision
        stored = dict((ctx.policy_state or {}).get(_STATE_KEY) or {})
        serving_target = stored.pop("serving_target", None)
        signals = signals_from_context(ctx, self.running_per_replica, self.parked, serving_target)
        target, state = decide(signals, PolicyState(**stored), self.config)
        if target != signals.target_replicas:
            direction = "up" if target > signals.target_replicas else "down"
            reason = scale_reason(signals, target, self.config)
            self._scale_events.inc(tags={"direction": direction, "reason": reason})
            logger.info("autoscale: %d -> %d serving replicas (%s), %d parked (queue %d, oldest wait "
                        "%.2f s, running %d, kv %.2f, ttft %.2f s)", signals.target_replicas,
                        target, reason, self.parked, signals.queue_len, signals.oldest_wait_s,
                        signals.num_running, signals.max_kv_usage, signals.recent_ttft_s)
        return target + self.parked, {_STATE_KEY: {**asdict(state), "serving_target": target}}


def signals_from_context(ctx, running_per_replica: int, parked: int = 0,
                         serving_target: int | None = None) -> Signals:
    """Collapse Serve's per-replica metrics into the policy's `Signals`, counting only the
    serving replicas (a replica whose parked flag averaged over half is parked; with parked
    replicas configured, one that has sent no metrics yet is not counted as serving, or a
    new deployment's parked replica would ratchet the serving target up). The previous
    serving target is at least the serving count: a replica the router un-parked stays."""
    metrics = ctx.aggregated_metrics or {}

    def per_replica(name: str) -> list[float]:
        return [float(v) for v in (metrics.get(name) or {}).values()]

    if parked:  # a replica serves once it says so: one without metrics yet is still starting
        serving = sum(1 for v in per_replica(PARKED) if v < 0.5)
    else:
        serving = int(ctx.current_num_replicas)
    previous = (serving_target if serving_target is not None
                else max(0, int(ctx.target_num_replicas) - parked))

    router_queue = max(per_replica(ROUTER_QUEUE_LEN), default=0.0)
    handle_queue = float(ctx.total_queued_requests or 0.0)
    return Signals(
        now=float(ctx.current_time) if ctx.current_time is not None else 0.0,
        current_replicas=serving,
        target_replicas=max(previous, serving),
        queue_len=round(router_queue + handle_queue),
        oldest_wait_s=max(per_replica(ROUTER_OLDEST_WAIT_S), default=0.0),
        num_running=round(sum(per_replica(NUM_RUNNING)) + sum(per_replica(NUM_WAITING))),
        max_kv_usage=max(per_replica(KV_USAGE), default=0.0),
        recent_ttft_s=max(per_replica(RECENT_TTFT_S), default=0.0),
        running_per_replica=running_per_replica,
    )


def serve_autoscaling_config(config: AutoscaleConfig, running_per_replica: int,
                             parked: int = 0, retirable: bool = False) -> dict:
    """The `autoscaling_config` of the replica deployment: our policy, with Serve's own delays
    off (the policy does its own hysteresis). Serve's bounds count the parked replicas too.
    `retirable`: a rollout may retire it, so Serve's minimum is 0 (the policy keeps its own)."""
    # `running_per_replica` is resolved here: left out of the YAML it is None, and a None
    # passed on would override the engine's value.
    kwargs = config.model_dump(exclude={"graceful_shutdown_timeout_s", "membership_poll_s",
                                        "running_per_replica"})
    running_per_replica = config.running_per_replica or running_per_replica
    return {
        "min_replicas": 0 if retirable else config.min_replicas + parked,
        "initial_replicas": max(1, config.min_replicas) + parked,
        "max_replicas": config.max_replicas + parked,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": config.look_back_period_s,
        "metrics_interval_s": config.metrics_interval_s,
        "policy": {
            "policy_function": f"{__name__}:{ReplicaAutoscalingPolicy.__name__}",
            "policy_kwargs": {"running_per_replica": running_per_replica, "parked": parked,
                              **kwargs},
        },
    }


def fixed_until_retired_config(num_replicas: int) -> dict:
    """The `autoscaling_config` of a fixed-size deployment in a rollout (`FixedUntilRetired`)."""
    timing = AutoscaleConfig()  # how fast the replicas' retired flag reaches the policy
    return {
        "min_replicas": 0,
        "initial_replicas": num_replicas,
        "max_replicas": num_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": timing.look_back_period_s,
        "metrics_interval_s": timing.metrics_interval_s,
        "policy": {"policy_function": f"{__name__}:{FixedUntilRetired.__name__}",
                   "policy_kwargs": {"num_replicas": num_replicas}},
    }
