"""The Serve application: `build_app(args)` binds the ingress, the router actor and the replicas.

    serve run ray_configs/local.yaml      # import path pagedserve.cluster.app:build_app
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from pagedserve.autoscale.serve_policy import (
    fixed_until_retired_config,
    serve_autoscaling_config,
)
from pagedserve.cluster.ingress import IngressDeployment
from pagedserve.cluster.pinned_router import PinnedRequestRouter
from pagedserve.cluster.rollout import CANARY, versions_key
from pagedserve.cluster.router import RouterDeployment
from pagedserve.config import ClusterConfig
from pagedserve.replicas.deployment import ReplicaDeployment
from pagedserve.replicas.parallel.workers import placement_bundles

APP_NAME = "pagedserve"
INGRESS_MAX_ONGOING = 4096  # the ingress only waits on I/O
EXTRA_REPLICA_CALLS = 16  # stats and health calls beside generation streams
REPLICA_DEPLOYMENT = "Replica"
CANARY_DEPLOYMENT = "ReplicaCanary"  # a rollout's new model version
GRACEFUL_WAIT_LOOP_S = 0.5  # how often a stopping replica checks that its streams have ended
DRAIN_TIMEOUT_S = 60.0  # a stopping ingress's or fixed-size replica's streams end within this
PARKED_HOLD_S = 30.0  # a fixed-size deployment parks an extra un-parked replica after this


def build_app(args: dict | None = None) -> Application:
    """Validate `args` as a ClusterConfig (unknown keys are an error) and bind the app."""
    config = ClusterConfig(**(args or {}))
    as_dict = config.model_dump()
    router = serve.deployment(
        RouterDeployment, name="Router", num_replicas=1,
        max_ongoing_requests=config.router.max_queue_len + 1024,
        ray_actor_options=_control_actor_options(config),
        logging_config={"enable_access_log": False},  # capacity reports arrive every 50 ms
    ).bind(config.router.model_dump(), **_router_extras(config))
    replicas = _replica_deployment(config, REPLICA_DEPLOYMENT,
                                   _replica_count_options(config)).bind(as_dict, router)
    canary = None
    if config.rollout is not None:  # the new version (same tokenizer), its own engine config
        canary_config = config.model_copy(update={"engine": config.rollout.engine})
        canary = _replica_deployment(
            canary_config, CANARY_DEPLOYMENT, _fixed_count(config.rollout.num_replicas, True),
        ).bind(canary_config.model_dump(), router, CANARY)
    return serve.deployment(
        IngressDeployment, name="Ingress", num_replicas=config.num_ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options=_control_actor_options(config),
        # A replaced ingress (a redeploy) stops once its streams ended, as replicas do.
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
        graceful_shutdown_wait_loop_s=GRACEFUL_WAIT_LOOP_S,
    ).bind(as_dict, router, replicas, canary)


def _control_actor_options(config: ClusterConfig) -> dict:
    """The router's and the ingress's actor options: no CPU, the configured resources."""
    options = {"num_cpus": 0}
    if config.control_resources:
        options["resources"] = dict(config.control_resources)
    return options


def _replica_deployment(config: ClusterConfig, name: str, count: dict):
    # Tensor parallelism: one placement group per replica, a bundle per rank, on one node.
    bundles = placement_bundles(config)
    group = {} if bundles is None else {"placement_group_bundles": bundles,
                                        "placement_group_strategy": "STRICT_PACK"}
    return serve.deployment(
        ReplicaDeployment, name=name, **count,
        max_ongoing_requests=(config.engine.max_num_seqs + config.router.max_waiting_per_replica
                              + EXTRA_REPLICA_CALLS),
        ray_actor_options={"num_cpus": config.replica_num_cpus,
                           "num_gpus": config.replica_num_gpus},
        request_router_config=_request_router_config(config),
        **group,
    )


def _request_router_config(config: ClusterConfig) -> RequestRouterConfig:
    """Calls go where our router admitted them (pinned), or, with `router.policy: serve`,
    where Serve's default request router (power of two choices) puts them."""
    if config.router.policy == "serve":
        return RequestRouterConfig()
    return RequestRouterConfig(request_router_class=PinnedRequestRouter)


def _replica_count_options(config: ClusterConfig) -> dict:
    """A fixed `num_replicas`, or our autoscaling policy, each with a drain long enough for
    streams. In a rollout, the losing version's deployment scales itself to 0 replicas."""
    autoscale = config.autoscaling
    parked = config.standby.parked
    retirable = config.rollout is not None
    if autoscale is None:
        return _fixed_count(config.num_replicas + parked, retirable)
    return {
        "autoscaling_config": serve_autoscaling_config(autoscale, config.engine.max_num_seqs,
                                                       parked, retirable),
        "graceful_shutdown_timeout_s": autoscale.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": GRACEFUL_WAIT_LOOP_S,
    }


def _fixed_count(num_replicas: int, retirable: bool) -> dict:
    count = ({"autoscaling_config": fixed_until_retired_config(num_replicas)} if retirable
             else {"num_replicas": num_replicas})
    return {**count, "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S,
            "graceful_shutdown_wait_loop_s": GRACEFUL_WAIT_LOOP_S}


def _router_extras(config: ClusterConfig) -> dict:
    """What the router needs beyond admission: whom to drain, which replicas to park, which
    prefixes to count, and each node's services (weight store, standby engines)."""
    extras: dict = {"warm_prefixes": config.warm_prefixes.model_dump()}
    if config.rollout is not None:
        extras["rollout"] = config.rollout.model_dump(
            include={"canary_share", "max_error_rate", "window_s", "min_requests",
                     "max_ttft_ratio", "ttft_tolerance_s"})
        extras["rollout"]["key"] = versions_key(config.engine.model_dump(),
                                                config.rollout.engine.model_dump())
        extras["canary_deployment"] = CANARY_DEPLOYMENT
    # Whom Serve stops (a scale-down, a redeploy, a rollout's loser): drained at once.
    extras["replica_deployment"] = REPLICA_DEPLOYMENT
    autoscale = config.autoscaling
    if autoscale is not None:
        extras["membership_poll_s"] = autoscale.membership_poll_s
    if config.standby.parked:
        serving = max(1, autoscale.min_replicas) if autoscale else config.num_replicas
        hold_s = autoscale.scale_down_after_s if autoscale else PARKED_HOLD_S
        extras["parking"] = {"parked": config.standby.parked, "serving_target": serving,
                             "hold_s": hold_s}
    services: dict = {"model": config.engine.model}
    store = config.weight_store
    if store is not None and store.enabled:
        services["weight_store"] = {"max_gib": store.max_gib}
    if config.standby.per_node:
        services["standby"] = {"engine": config.engine.model_dump(), "mode": config.standby.mode,
                               "per_node": config.standby.per_node}
    if config.standby.warm_workers:
        services["warm_workers"] = config.standby.warm_workers
    if len(services) > 1:
        extras["node_services"] = services
    return extras
