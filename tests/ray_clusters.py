"""Ray clusters a test module owns, and leaving a cluster cleanly, so one pytest process can
be the driver of several clusters in turn (the served cluster, then the modules' own ones).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import ray

# Joined in turn: the suite joins the served cluster first (tests/integration) and starts its
# own clusters after it (tests/local_cluster, a few unit modules), each left through this.
from pagedserve.bench.serve_process import leave_ray_cluster  # noqa: F401 (imported from here)


@contextlib.contextmanager
def own_ray_cluster(num_cpus: int, **init_args) -> Iterator[None]:
    """A fresh local Ray cluster for the caller alone; Serve and Ray are shut down after.
    `init_args`: more `ray.init` arguments (the dashboard, a metrics export port)."""
    if ray.is_initialized():
        raise RuntimeError("this process is still the driver of another Ray cluster; a module "
                           "that owns its cluster must not run while the served one is joined")
    _start_local_cluster(num_cpus, init_args)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        leave_ray_cluster()


HEAD_START_TIMEOUTS = ("Timed out waiting for file", "timed out during startup")


@contextlib.contextmanager
def own_node_cluster(head_cpus: int = 0) -> Iterator[ray.cluster_utils.Cluster]:
    """A fresh multi-node cluster on this machine (`ray.cluster_utils.Cluster`), its head only
    at first; the caller adds (and removes) worker nodes. This driver is joined to it."""
    if ray.is_initialized():
        raise RuntimeError("this process is still the driver of another Ray cluster")
    nodes = _start_head(head_cpus)
    try:
        ray.init(address=nodes.address, logging_level="warning")
        yield nodes
    finally:
        from ray import serve

        serve.shutdown()
        leave_ray_cluster()
        nodes.shutdown()


def _start_head(head_cpus: int, attempts: int = 2):
    """A `Cluster` with its head started, tried again once if the head's daemons never came up.

    Once in CI the head's GCS never wrote its port file ("Timed out waiting for file
    .../gcs_server_port_..."), and once its node never registered ("The current node timed out
    during startup", a bare Exception): the fork hazard `_start_local_cluster` describes; a
    second start gets a fresh fork. The failed head's processes are stopped first.
    """
    from ray.cluster_utils import Cluster

    for attempt in range(1, attempts + 1):
        try:
            return Cluster(initialize_head=True, head_node_args={
                "num_cpus": head_cpus, "include_dashboard": False})
        except Exception as err:  # Ray raises a bare Exception for the second case
            if attempt == attempts or not any(sign in str(err) for sign in HEAD_START_TIMEOUTS):
                raise
            warnings.warn(f"the head node did not start ({err}); starting it again",
                          stacklevel=2)
            _stop_unregistered_head()
    raise AssertionError("unreachable")


def _stop_unregistered_head() -> None:
    """Stop the Ray daemons a failed `Cluster` head left (they belong to no cluster object)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                   capture_output=True, timeout=120, check=False)


def _start_local_cluster(num_cpus: int, init_args: dict | None = None, attempts: int = 2) -> None:
    """`ray.init` of a new local cluster, tried again once if its raylet never registered.

    Ray forks its daemons from this process with a `preexec_fn`, which Python warns can
    deadlock in the child when other threads are running; this process has many (Serve's
    router, gRPC). Twice in CI the raylet of the cluster started after the served one never
    wrote a log and `ray.init` timed out after 30 s; a second start gets a fresh fork.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, logging_level="warning",
                     **{"include_dashboard": False, **(init_args or {})})
            return
        except Exception as err:  # Ray raises a bare Exception for this
            if attempt == attempts or "timed out during startup" not in str(err):
                raise
            warnings.warn(f"local Ray cluster did not start ({err}); starting it again",
                          stacklevel=2)
            ray.shutdown()
