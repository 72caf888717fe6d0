"""Warm Ray workers: a node's services keep an idle worker (with Ray Serve imported, where the
raylet preloads it), and a new actor starts in it instead of in a new process.

Runs its own small local Ray cluster, started with the preload setting as `pagedserve serve`
starts one.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
from ray_clusters import own_ray_cluster

from pagedserve.replicas.node.warm_workers import (
    PRELOAD_ENV,
    idle_workers,
    preload_environment,
    top_up,
)

WAIT_S = 60.0


@pytest.fixture(scope="module")
def preloading_ray():
    saved = os.environ.get(PRELOAD_ENV)
    os.environ.update(preload_environment())  # the raylet inherits it
    try:
        with own_ray_cluster(num_cpus=4):
            yield
    finally:
        if saved is None:
            os.environ.pop(PRELOAD_ENV, None)
        else:
            os.environ[PRELOAD_ENV] = saved


@ray.remote(num_cpus=0)
class NodeService:
    """Stands in for a node's services: tops up and counts warm workers from inside the job."""

    def top_up(self, target: int) -> int:
        return top_up(target)

    def idle(self) -> int:
        return idle_workers()


@ray.remote(num_cpus=1)
class Probe:
    """What a replica's actor finds when it starts: its process's age and Serve's import."""

    def __init__(self) -> None:
        import psutil

        self.serve_preloaded = "ray.serve._private.replica" in sys.modules
        self.process_started = psutil.Process().create_time()

    def facts(self) -> dict:
        return {"serve_preloaded": self.serve_preloaded, "process_started": self.process_started,
                "pid": os.getpid()}


def _wait_idle(service, count: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while (idle := ray.get(service.idle.remote())) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{idle} idle warm workers after {WAIT_S:.0f} s, expected {count}")
        time.sleep(0.2)
    return idle


def test_a_new_actor_starts_in_a_warm_worker_with_serve_imported(preloading_ray):
    service = NodeService.remote()
    ray.get(service.top_up.remote(1))
    _wait_idle(service, 1)
    requested = time.time()
    probe = Probe.remote()
    facts = ray.get(probe.facts.remote())
    assert facts["process_started"] < requested - 0.5, facts  # an existing process, not a new one
    assert facts["serve_preloaded"], facts  # Ray Serve was imported before the actor came
    ray.kill(probe)


def test_top_up_asks_only_for_the_missing_workers(preloading_ray):
    service = NodeService.remote()
    ray.get(service.top_up.remote(1))
    idle = _wait_idle(service, 1)
    assert ray.get(service.top_up.remote(idle)) == 0  # enough idle ones: asks for none
    assert ray.get(service.top_up.remote(idle + 1)) == 1
    _wait_idle(service, idle + 1)
