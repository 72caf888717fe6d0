"""A replica's start, phase by phase: weights (object store or disk), engine, warm-up.

Each phase is timed, logged in one line when the replica is ready, and recorded in the
`pagedserve_replica_startup_seconds` histogram (tag `phase`), so a slow scale-up shows which
phase holds it.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from pagedserve.config import ClusterConfig
from pagedserve.metric_list import serve_metric
from pagedserve.replicas.engine.engine_client import EngineClient
from pagedserve.replicas.engine.startup_phases import PhaseTimer, format_phases
from pagedserve.replicas.node.standby_client import claim_standby
from pagedserve.replicas.node.warm_workers import try_top_up
from pagedserve.replicas.node.weight_client import fetch_shared_weights

# Serve's own logger: its INFO lines reach the replica and controller log files (ours would
# stop at the root logger's WARNING level).
logger = logging.getLogger("ray.serve")

STORE_WAIT_S = 600.0  # the first store on a node may still be reading a large model


async def start_engine(config: ClusterConfig, router, timer: PhaseTimer,
                       init_method: str | None = None, app_name: str = "pagedserve",
                       gpu_ids: list[int] | None = None,
                       rank_failure=None) -> tuple[EngineClient, str]:
    """The replica's engine: an adopted standby of its node, else a new process, with its
    weights from the node's store when there is one. `rank_failure`: see `EngineClient`.

    Returns the engine and where it came from: "standby_<mode>", "object_store" or "disk".
    """
    standby = None
    if config.standby.per_node > 0:
        with timer.phase("standby_claim"):
            standby = await claim_standby(config, router, app_name, gpu_ids or [])
    shared = None
    wants_store = standby is None or standby["mode"] == "imported"
    if wants_store and config.weight_store is not None and config.weight_store.enabled:
        with timer.phase("weight_fetch"):
            shared = await fetch_shared_weights(app_name, router, STORE_WAIT_S)
    loop = asyncio.get_running_loop()
    # `shared` is a view of the store's memory: the store keeps it for the next replica.
    engine = await loop.run_in_executor(None, functools.partial(
        EngineClient, config.engine, config.torch_threads,
        max_deltas_per_s=config.max_deltas_per_s, init_method=init_method,
        shared_weights=shared, standby=standby, gpu_ids=gpu_ids,
        rank_failure=rank_failure))
    timer.update(engine.startup_phases)
    # This replica may have taken the node's warm Ray worker: one for the next replica, in the
    # background (a raylet call, then that worker's imports, off this start's path).
    loop.run_in_executor(None, try_top_up, config.standby.warm_workers)
    if standby is not None:
        return engine, f"standby_{standby['mode']}"
    return engine, "object_store" if shared is not None else "disk"


def report_startup(replica_id: str, phases: dict[str, float], source: str) -> None:
    """Log the phases in one line and record them as metrics."""
    total = sum(phases.values())
    logger.info("replica %s ready in %.2f s (weights from %s): %s", replica_id, total, source,
                format_phases(phases))
    histogram = serve_metric("replica_startup_seconds")
    for phase, seconds in {**phases, "total": total}.items():
        histogram.observe(seconds, tags={"phase": phase, "weights_from": source})
    serve_metric("replica_starts").inc(tags={"weights_from": source})
