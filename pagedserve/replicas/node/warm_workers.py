"""Idle Ray workers kept on each node, so the next replica's actor starts in one.

Serve starts every replica as a Ray actor. Ray starts a new worker process for it (0.7-0.9 s
on a GPU host), and the process then imports Ray Serve (1.2-1.4 s) before any of our code
runs: over 2 s of every scale-up that no standby engine can remove. But the raylet gives a new
actor an idle worker that has never run anything, if one of the actor's job and runtime
environment exists, and every worker it starts first imports the modules named in its
`preload_python_modules` setting. So each node keeps `standby.warm_workers` such workers: the
node's services top them up when they start, and every replica tops up its node's once its
engine runs (it may have taken one). Where the raylet was started with
`RAY_preload_python_modules=ray.serve._private.replica` (`pagedserve serve`, the cluster
launcher config and the benchmarks set it; `preload_environment`), those workers have Ray
Serve imported too; elsewhere they still save the process start.

A warm worker holds no Ray resources (CPUs, GPUs): it never stops Serve from placing a replica.
It costs the memory of an idle Python process with Ray (and Ray Serve) imported, about
100-200 MB, and it lives `KEEP_ALIVE_S` even where the node has more workers than CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os

import ray

logger = logging.getLogger("ray.serve")

PRELOAD_ENV = "RAY_preload_python_modules"
PRELOAD_MODULES = "ray.serve._private.replica"
KEEP_ALIVE_S = 24 * 3600
RPC_TIMEOUT_S = 10.0
_NIL_ACTOR = b"\xff" * 16


def preload_environment() -> dict[str, str]:
    """Environment for a process that starts Ray nodes (`ray start`, `serve run`), so their
    workers import Ray Serve before they are needed; an existing setting is kept."""
    return {PRELOAD_ENV: os.environ.get(PRELOAD_ENV) or PRELOAD_MODULES}


def count_idle(worker_stats, job_id: bytes) -> int:
    """Workers of `job_id` that never ran a task or held an actor: ones a new actor can take.
    `worker_stats`: a raylet's `CoreWorkerStats` (`GetNodeStats`)."""
    from ray.core.generated import common_pb2

    return sum(1 for w in worker_stats
               if w.worker_type == common_pb2.WORKER and w.job_id == job_id
               and w.actor_id in (b"", _NIL_ACTOR) and w.num_executed_tasks == 0
               and w.num_running_tasks == 0)


def top_up(target: int, node_id: str | None = None) -> int:
    """Ask `node_id`'s raylet (default: the caller's node) for workers of the caller's job and
    runtime environment until `target` idle ones exist; returns how many it asked for."""
    if target <= 0:
        return 0
    from ray.core.generated import common_pb2, node_manager_pb2, runtime_environment_pb2

    context = ray.get_runtime_context()
    with _raylet(node_id or context.get_node_id()) as stub:
        missing = target - _idle(stub, context)
        if missing <= 0:
            return 0
        env = runtime_environment_pb2.RuntimeEnvInfo(
            serialized_runtime_env=context.get_runtime_env_string())
        stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, job_id=bytes.fromhex(context.get_job_id()),
            runtime_env_info=env, keep_alive_duration_secs=KEEP_ALIVE_S, num_workers=missing),
            timeout=RPC_TIMEOUT_S)
    return missing


def idle_workers(node_id: str | None = None) -> int:
    """How many idle workers of the caller's job `node_id` (default: the caller's) has now."""
    context = ray.get_runtime_context()
    with _raylet(node_id or context.get_node_id()) as stub:
        return _idle(stub, context)


def _idle(stub, context) -> int:
    from ray.core.generated import node_manager_pb2

    stats = stub.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(include_memory_info=False),
                              timeout=RPC_TIMEOUT_S)
    return count_idle(stats.core_workers_stats, bytes.fromhex(context.get_job_id()))


def try_top_up(target: int, node_id: str | None = None) -> int:
    """`top_up`, logging instead of raising: a node without warm workers is slower, not
    broken."""
    try:
        return top_up(target, node_id)
    except Exception as err:  # noqa: BLE001 (an RPC error, a dead node: the same remedy)
        logger.warning("could not start warm Ray workers on node %s: %r",
                       (node_id or "this")[:16], err)
        return 0


@contextlib.contextmanager
def _raylet(node_id: str):
    """A gRPC stub of `node_id`'s raylet on Ray's own channel (TLS and token auth as set)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import node_manager_pb2_grpc

    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive"):
            address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
            break
    else:
        raise LookupError(f"node {node_id[:16]} is not alive")
    channel = init_grpc_channel(address)
    try:
        yield node_manager_pb2_grpc.NodeManagerServiceStub(channel)
    finally:
        channel.close()
