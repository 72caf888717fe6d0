"""A starting replica's side of the standby pool: claim a standby engine, or say why not."""

from __future__ import annotations

import asyncio
import logging

import ray

from pagedserve.config import ClusterConfig
from pagedserve.replicas.node.services import STANDBY_POOL, find_or_ask
from pagedserve.replicas.node.weight_client import forget_service

logger = logging.getLogger("ray.serve")

CLAIM_TIMEOUT_S = 10.0


async def claim_standby(config: ClusterConfig, router, app_name: str,
                        gpu_ids: list[int]) -> dict | None:
    """A claimed standby of this node (see `StandbyPool.claim`), or None with a logged reason:
    the replica then spawns its engine process itself."""
    if config.engine.tensor_parallel_size > 1:
        logger.info("no standby engine: standbys run one rank, this replica runs %d; spawning",
                    config.engine.tensor_parallel_size)
        return None
    node_id = ray.get_runtime_context().get_node_id()
    try:
        pool = await find_or_ask(router, app_name, node_id, STANDBY_POOL)
        if pool is None:
            logger.warning("no standby engine: node %s has no standby pool; spawning",
                           node_id[:16])
            return None
        claimed = await asyncio.wait_for(pool.claim.remote(gpu_ids), CLAIM_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 (any failure has the same remedy: spawn)
        logger.warning("no standby engine: the standby pool failed (%r); spawning", err)
        if isinstance(err, ray.exceptions.RayActorError):
            await forget_service(router, node_id, STANDBY_POOL)
        return None
    if claimed is None:
        logger.warning("no standby engine: none ready on node %s%s; spawning", node_id[:16],
                       f" for GPU {gpu_ids[0]}" if gpu_ids else "")
    return claimed
