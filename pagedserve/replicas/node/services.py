"""Each node's services for starting replicas, by name: the weight store and the standby pool;
and the node's warm Ray workers (`warm_workers`).

The router creates them (`NodeServices`), at application start for its own node and on request
for any other, so they live exactly as long as the application. A starting replica finds its
node's by name (`find`); only when its node has none yet does it ask the router to make them.
"""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pagedserve.replicas.node.standby_pool import StandbyPool, pool_name
from pagedserve.replicas.node.warm_workers import try_top_up
from pagedserve.replicas.node.weight_store import WeightStore, store_name

logger = logging.getLogger(__name__)

WEIGHT_STORE, STANDBY_POOL = "weight store", "standby pool"


class NodeServices:
    """The router's per-node weight stores and standby pools."""

    def __init__(self, app_name: str, model: str | None = None, weight_store: dict | None = None,
                 standby: dict | None = None, warm_workers: int = 0) -> None:
        """`weight_store`: `{"max_gib"}` or None; `standby`: `{"engine", "per_node", "mode"}`
        or None (no standby engines); `warm_workers`: idle Ray workers to keep per node."""
        self.app_name, self.model = app_name, model
        self.weight_store, self.standby = weight_store, standby
        self.warm_workers = warm_workers
        self._actors: dict[tuple[str, str], ray.actor.ActorHandle] = {}

    def ensure(self, node_id: str) -> None:
        """Start whichever of this node's services are configured and not running, and top up
        its warm Ray workers."""
        try_top_up(self.warm_workers, node_id)
        affinity = NodeAffinitySchedulingStrategy(node_id, soft=False)
        if self.weight_store is not None and (node_id, WEIGHT_STORE) not in self._actors:
            self._actors[node_id, WEIGHT_STORE] = WeightStore.options(
                name=store_name(self.app_name, node_id), get_if_exists=True,
                scheduling_strategy=affinity,
            ).remote(self.model, int(self.weight_store["max_gib"] * 2**30))
        if self.standby is not None and (node_id, STANDBY_POOL) not in self._actors:
            # The store first: its name exists from here on, so the pool finds it (and waits
            # for it) even while it is still loading.
            store = store_name(self.app_name, node_id) if self.weight_store is not None else None
            pool = StandbyPool.options(
                name=pool_name(self.app_name, node_id), get_if_exists=True,
                scheduling_strategy=affinity,
            ).remote(self.standby["engine"], self.standby["per_node"], self.standby["mode"],
                     _node_gpus(node_id), store)
            pool.start.remote()
            self._actors[node_id, STANDBY_POOL] = pool

    def forget(self, node_id: str, kind: str) -> None:
        """Drop a dead service, so the next `ensure` for its node makes a new one."""
        actor = self._actors.pop((node_id, kind), None)
        if actor is not None:
            try:
                ray.kill(actor)  # frees the name for the new one
            except Exception as err:  # noqa: BLE001 (it is dead already, most likely)
                logger.info("could not kill the old %s: %r", kind, err)


def find(app_name: str, node_id: str, kind: str):
    """This node's service of `kind` by name, or None if it has none."""
    name = store_name(app_name, node_id) if kind == WEIGHT_STORE else pool_name(app_name, node_id)
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


async def find_or_ask(router, app_name: str, node_id: str, kind: str):
    """This node's service of `kind`; if it has none, ask the router to start it first."""
    actor = find(app_name, node_id, kind)
    if actor is None and router is not None and await router.ensure_node_services.remote(node_id):
        actor = find(app_name, node_id, kind)
    return actor


def _node_gpus(node_id: str) -> int:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return int(node.get("Resources", {}).get("GPU", 0))
    return 0
