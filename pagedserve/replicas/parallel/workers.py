"""Tensor-parallel rank workers of a replica: Ray actors in the replica's placement group.

The replica deployment asks Serve for one placement group per replica (`placement_bundles`:
bundle 0 for the replica actor, which runs rank 0 in its engine process, and one bundle per
further rank, STRICT_PACK so the group shares one node and its GPU links). The replica then
starts ranks 1..N-1 here, each in its own bundle, pointed at a rendezvous address with a port
free on that node. A rank's `run` call lasts as long as the group: its ObjectRef completing
means the rank stopped, which the replica watches to fail fast.
"""

from __future__ import annotations

import asyncio

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedserve.config import ClusterConfig
from pagedserve.replicas.parallel.rendezvous import rendezvous_address


def placement_bundles(config: ClusterConfig) -> list[dict[str, float]] | None:
    """One bundle per rank (None without tensor parallelism): each gets the replica's CPUs and GPUs."""
    size = config.engine.tensor_parallel_size
    if size == 1:
        return None
    bundle = {"CPU": config.replica_num_cpus}
    if config.replica_num_gpus:
        bundle["GPU"] = config.replica_num_gpus
    return [dict(bundle) for _ in range(size)]


@ray.remote(max_concurrency=2)  # `ping` is answered while `run` follows the steps
class RankWorker:
    """Rank `rank` > 0 of one replica's tensor-parallel group."""

    def run(self, engine_config: dict, rank: int, init_method: str,
            torch_threads: int | None) -> None:
        from pagedserve.replicas.parallel.ranks import run_rank  # torch: the rank's process only

        run_rank(engine_config, rank, init_method, None, torch_threads)

    def ping(self) -> str:
        return "ok"


class RankWorkers:
    """Ranks 1..N-1 of one replica, started in bundles 1..N-1 of its placement group.

    The group is the caller's own (a replica's) unless one is given; with none at all (a plain
    driver) the actors are scheduled like any other.
    """

    def __init__(self, config: ClusterConfig, name_prefix: str, placement_group=None) -> None:
        engine = config.engine
        group = placement_group or ray.util.get_current_placement_group()
        self.init_method = rendezvous_address(ray.util.get_node_ip_address())
        self.namespace = ray.get_runtime_context().namespace
        self.names = [f"{name_prefix}-rank{rank}" for rank in range(1, engine.tensor_parallel_size)]
        self.actors, self.runs = [], []
        for rank, name in enumerate(self.names, start=1):
            strategy = None
            if group is not None:
                strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            actor = RankWorker.options(
                name=name, num_cpus=config.replica_num_cpus, num_gpus=config.replica_num_gpus,
                scheduling_strategy=strategy,
            ).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(engine.model_dump(), rank, self.init_method,
                                              config.torch_threads))

    async def wait_until_one_stops(self) -> str:
        """Return a description of the first rank whose `run` ended (normally or not)."""
        tasks = [asyncio.ensure_future(self._outcome(rank, ref))
                 for rank, ref in enumerate(self.runs, start=1)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        return next(iter(done)).result()

    def stopped(self) -> str | None:
        """A description of a rank that stopped, or None while all run (does not wait)."""
        ready, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not ready:
            return None
        rank = self.runs.index(ready[0]) + 1
        try:
            ray.get(ready[0])
        except Exception as err:
            return _failed(rank, err)
        return f"tensor-parallel rank {rank} exited"

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    @staticmethod
    async def _outcome(rank: int, ref) -> str:
        try:
            await ref
        except Exception as err:
            return _failed(rank, err)
        return f"tensor-parallel rank {rank} exited"


def _failed(rank: int, err: Exception) -> str:
    """One line naming the rank and its error: the rank's own exception for a task error (not
    Ray's traceback-laden wrapper), or how its actor died."""
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        err = err.cause
    return f"tensor-parallel rank {rank} failed: {type(err).__name__}: {err}"
