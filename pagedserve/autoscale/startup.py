"""A replica's start, phase by phase: weights (object store or disk), engine, warm-up.

Each phase is timed, logged in one line when the replica is ready, and recorded in the
`pagedserve_replica_startup_seconds` histogram (tag `phase`), so a slow scale-up shows which
phase holds it.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from ray.serve.metrics import Counter, Histogram

from pagedserve.autoscale.weight_client import fetch_shared_weights
from pagedserve.config import ClusterConfig
from pagedserve.replicas.engine.process_engine import ProcessEngine
from pagedserve.replicas.engine.startup_phases import PhaseTimer, format_phases

# Serve's own logger: its INFO lines reach the replica and controller log files (ours would
# stop at the root logger's WARNING level).
logger = logging.getLogger("ray.serve")

STORE_WAIT_S = 600.0  # the first store on a node may still be reading a large model
PHASE_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]


async def start_engine(config: ClusterConfig, router, timer: PhaseTimer,
                       init_method: str | None = None) -> tuple[ProcessEngine, str]:
    """The replica's engine, with its weights from the node's store when there is one.

    Returns the engine and where its weights came from: "object_store" or "disk".
    """
    shared = None
    if config.weight_store is not None and config.weight_store.enabled and router is not None:
        with timer.phase("weight_fetch"):
            shared = await fetch_shared_weights(router, STORE_WAIT_S)
    loop = asyncio.get_running_loop()
    try:
        engine = await loop.run_in_executor(None, functools.partial(
            ProcessEngine, config.engine, config.torch_threads,
            max_deltas_per_s=config.max_deltas_per_s, init_method=init_method,
            shared_weights=shared))
    finally:
        if shared is not None:
            shared.unlink()  # the engine copied the tensors out (or failed)
    timer.update(engine.startup_phases)
    return engine, "object_store" if shared is not None else "disk"


def report_startup(replica_id: str, phases: dict[str, float], source: str) -> None:
    """Log the phases in one line and record them as metrics."""
    total = sum(phases.values())
    logger.info("replica %s ready in %.2f s (weights from %s): %s", replica_id, total, source,
                format_phases(phases))
    histogram = Histogram("pagedserve_replica_startup_seconds", boundaries=PHASE_BOUNDARIES,
                          tag_keys=("phase", "weights_from"),
                          description="wall time of each phase of a replica's start")
    for phase, seconds in {**phases, "total": total}.items():
        histogram.observe(seconds, tags={"phase": phase, "weights_from": source})
    Counter("pagedserve_replica_starts", tag_keys=("weights_from",),
            description="replicas started, by where their weights came from"
            ).inc(tags={"weights_from": source})
