"""Faults under load on a 3-node cluster: the Serve controller, the router actor, an ingress
replica and a whole node are each lost while streaming requests run and wait in the router.

Three raylets on this machine (`ray.cluster_utils.Cluster`): the head with no CPUs (Serve's
controller, the router and the ingress), and two worker nodes with one replica each (1 and 2
CPUs: the second has room for the replacement of the first). `control_resources` keeps the
router and the ingress (and their replacements) on the head. Each test counts the requests
sent, succeeded, and ended with an error before or after their first token, and checks that
every replica's KV blocks are all free at the end. The tests run in file order; losing the
node comes last because the cluster stays smaller after it.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from fault_load import Load, with_load
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray_clusters import own_node_cluster

from pagedserve.cluster.app import build_app

pytestmark = pytest.mark.slow

APP = "pagedserve-faults"
NUM_BLOCKS = 64
MAX_TOKENS = 48
# Four sequences run at once (two replicas, two each); the others wait in the router.
CONCURRENCY = 7
BODY = {"model": "tiny", "prompt": "w5 w6 w7 w8 w9", "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True}
TIMEOUT_S = 120
LONG_STREAM_TOKENS = 480  # two such sequences fit a replica's 64 blocks of 16 tokens


@pytest.fixture(scope="module")
def cluster(tiny_model_factory):
    args = {"engine": {"model": str(tiny_model_factory("llama-gqa-tied")), "device": "cpu",
                       "dtype": "float32", "num_kvcache_blocks": NUM_BLOCKS, "max_num_seqs": 2},
            "served_model_name": "tiny", "num_replicas": 2, "replica_num_cpus": 1,
            "torch_threads": 1, "weight_store": {},
            # The router and the ingress stay on the head node, their replacements too.
            "control_resources": {"node:__internal_head__": 0.001}}
    with own_node_cluster(head_cpus=0) as nodes:
        serve.start(proxy_location="Disabled")
        # The head is the only node at first, so the router and the ingress start there;
        # the replicas wait for CPUs, then take one worker node each.
        serve._run(build_app(args), name=APP, route_prefix=None, _blocking=False)  # noqa: SLF001
        first = nodes.add_node(num_cpus=1)
        wait_for(lambda: _replica_nodes() == {first.node_id}, "a replica on the first worker")
        second = nodes.add_node(num_cpus=2)
        wait_for(lambda: len(_serving()) == 2, "two replicas serving")
        print("session:", ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
        yield {"nodes": nodes, "workers": [first, second]}


def test_controller_killed_requests_keep_flowing(cluster):
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    load = _load()
    asyncio.run(with_load(load, lambda: ray.kill(controller, no_restart=False), settle_s=8))
    counts = load.counts()
    print(counts)
    assert counts["sent"] > CONCURRENCY and counts["succeeded"] == counts["sent"], \
        (counts, load.failed()[:3])
    _check_all_blocks_free()


def test_router_killed_queued_requests_are_resubmitted(cluster):
    load = _load()
    queued = []

    def kill_router() -> None:
        queued.append(wait_for(lambda: _router_stats()["queue_len"], "requests queued"))
        _kill_only_replica("Router")

    asyncio.run(with_load(load, kill_router, settle_s=4))
    wait_for(lambda: _replaced("Router"), "a new router")
    counts = load.counts()
    print(counts)
    assert queued[0] > 0
    # Nobody saw an error: streams do not pass through the router, and the requests that
    # waited in it were submitted again to the new one.
    assert counts["succeeded"] == counts["sent"], (counts, load.failed()[:3])
    _check_all_blocks_free()


def test_ingress_killed_its_streams_end_and_new_requests_are_served(cluster):
    load = _load()
    killed_at = asyncio.run(with_load(load, lambda: _kill_only_replica("Ingress"), settle_s=25))
    failed = load.failed()
    assert failed, "no stream was in the killed ingress"
    # The requests that failed were in the ingress when it died, or sent to it before this
    # client's handle saw it fail; everything sent after that is served by its replacement.
    seen_dead_at = min(o.ended_at for o in failed)
    assert seen_dead_at >= killed_at
    assert all(o.sent_at <= seen_dead_at and "killed by `ray.kill`" in o.error for o in failed), \
        [(o, seen_dead_at) for o in failed][:3]
    after = load.counts(since=seen_dead_at)
    print(load.counts(), after)
    assert after["sent"] > 0 and after["succeeded"] == after["sent"], after
    _check_all_blocks_free()


def test_node_removed_unstarted_requests_are_readmitted(cluster):
    nodes, (first, second) = cluster["nodes"], cluster["workers"]
    # Long streams: the lost node's worker runs on until it sees its raylet gone, and streams
    # of 48 tokens could all finish first (then none is cut and the test shows nothing).
    load = _load(LONG_STREAM_TOKENS)

    (doomed,) = [r.replica_id for r in _details("Replica") if r.node_id == first.node_id]
    # Only replicas are lost with the node: the replaced router and ingress run on the head.
    head = cluster["nodes"].head_node.node_id
    assert {r.node_id for d in ("Router", "Ingress") for r in _details(d)} == {head}

    def remove_first_worker() -> None:
        def busy():  # streams run on the doomed replica and others wait in the router
            stats = _router_stats()
            return stats["queue_len"] and stats["replicas"][doomed]["num_running"]

        wait_for(busy, "streams on the first worker's replica and requests queued")
        nodes.remove_node(first, allow_graceful=False)

    asyncio.run(with_load(load, remove_first_worker, settle_s=12))
    counts = load.counts()
    print(counts)
    assert counts["errored_before_start"] == 0, (counts, load.failed()[:3])
    assert counts["succeeded"] + counts["errored_after_start"] == counts["sent"], counts
    assert counts["errored_after_start"] > 0, counts  # the streams on the lost node
    # A stream cut off by the node's loss ends with the service's error, not Ray's.
    assert all("failed after it started" in o.error for o in load.failed()), load.failed()[:3]
    # The warm minimum is back, on the surviving worker node.
    wait_for(lambda: len(_serving()) == 2 and _replica_nodes() == {second.node_id},
             "two replicas serving on the surviving node")
    _check_all_blocks_free()


def _load(max_tokens: int = MAX_TOKENS) -> Load:
    return Load(serve.get_app_handle(APP), {**BODY, "max_tokens": max_tokens}, CONCURRENCY)


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (ray.exceptions.RayError, KeyError):  # the actor asked is restarting
            value = None
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _details(deployment: str):
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return ray.get(controller.get_deployment_details.remote(APP, deployment), timeout=30).replicas


def _replica_nodes() -> set[str]:
    return {r.node_id for r in _details("Replica") if str(r.state.value) == "RUNNING"}


def _router_stats() -> dict:
    return serve.get_deployment_handle("Router", APP).stats.remote().result(timeout_s=30)


def _serving() -> dict:
    """The replicas the router admits to, if Serve runs each of them."""
    running = {r.replica_id for r in _details("Replica") if str(r.state.value) == "RUNNING"}
    replicas = _router_stats()["replicas"]
    return {rid: s for rid, s in replicas.items() if rid in running and not s["draining"]}


_killed: dict[str, str] = {}


def _kill_only_replica(deployment: str) -> None:
    (replica,) = _details(deployment)
    _killed[deployment] = replica.replica_id
    ray.kill(ray.get_actor(replica.actor_name, namespace=SERVE_NAMESPACE), no_restart=True)


def _replaced(deployment: str) -> bool:
    replicas = _details(deployment)
    return any(r.replica_id != _killed[deployment] and str(r.state.value) == "RUNNING"
               for r in replicas)


def _check_all_blocks_free() -> None:
    """Every replica Serve runs reports all of its blocks free and nothing running."""
    def all_free():
        serving = _serving()
        return len(serving) == 2 and all(
            s["num_free_blocks"] == NUM_BLOCKS and s["num_running"] == 0
            for s in serving.values())

    wait_for(all_free, "every replica's blocks free", timeout_s=60)
