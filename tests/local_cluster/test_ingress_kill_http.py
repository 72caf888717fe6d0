"""An ingress replica killed under HTTP streaming load, in Serve's HAProxy mode as
`pagedserve serve --haproxy` runs it: only streams that had begun fail (cut off); a request the
dead replica held without answering is retried by HAProxy on the other ingress replica
(`pagedserve/haproxy_launch.py`: without it, HAProxy closed 1-5 such clients' connections per
kill with no response), everything after goes to the other replica, and Serve replaces the
dead one.

Its own `serve run` (a tiny random model, one replica, two ingress replicas) on free ports.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import yaml
from fault_load import HttpLoad, with_load
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray_clusters import leave_ray_cluster
from redis_server import free_port
from serve_cli import serve_run

from pagedserve.bench.serve_process import haproxy_environment, ray_address

pytestmark = pytest.mark.integration
APP = "pagedserve"
MAX_TOKENS = 32
CONCURRENCY = 6
BLOCKS = 128
NO_DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


@pytest.fixture(scope="module")
def served(tiny_model_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingress-kill")
    port = free_port()
    args = {"engine": {"model": str(tiny_model_factory("llama-gqa-tied")), "device": "cpu",
                       "dtype": "float32", "num_kvcache_blocks": BLOCKS, "max_num_seqs": 4},
            "served_model_name": "tiny", "num_replicas": 1, "num_ingress_replicas": 2,
            "replica_num_cpus": 1, "torch_threads": 1, "warm_prefixes": {"top_k": 0}}
    config = {"http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": APP, "route_prefix": "/",
                                "import_path": "pagedserve.cluster.app:build_app",
                                "args": args}]}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**haproxy_environment(), **NO_DRAIN}
    with serve_run(path, f"http://127.0.0.1:{port}", tmp / "serve.log", env=env) as proc:
        ray.init(address=ray_address(proc), logging_level="warning", log_to_driver=False)
        try:
            yield {"url": f"http://127.0.0.1:{port}", "env": env}
        finally:
            leave_ray_cluster()


def _ingress_replicas() -> list:
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_deployment_details.remote(APP, "Ingress"), timeout=30)
    return [r for r in details.replicas if str(r.state.value) == "RUNNING"]


def _replica_reports() -> dict:
    return serve.get_deployment_handle("Router", APP).stats.remote().result(
        timeout_s=30)["replicas"]


def _wait_until_every_block_is_free(timeout_s: float = 60) -> None:
    """Nothing of the dead ingress's streams (cut, or sent again elsewhere) runs on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = _replica_reports()
        if reports and all(r["num_free_blocks"] == BLOCKS and r["num_running"] == 0
                           for r in reports.values()):
            return
        time.sleep(0.5)
    pytest.fail(f"blocks still held after {timeout_s} s: {_replica_reports()}")


def _wait_for_ingress_replicas(count: int, timeout_s: float = 120) -> list:
    """Until Serve runs `count` ingress replicas (the app answers /readyz with one)."""
    deadline = time.monotonic() + timeout_s
    while len(replicas := _ingress_replicas()) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(replicas) == count, replicas
    return replicas


def test_a_killed_ingress_fails_only_streams_it_had_begun_and_haproxy_moves_on(served):
    replicas = _wait_for_ingress_replicas(2)
    load = HttpLoad(served["url"], {"model": "tiny", "prompt": "w5 w6 w7 w8",
                                    "max_tokens": MAX_TOKENS, "temperature": 0,
                                    "ignore_eos": True}, CONCURRENCY)
    victim = replicas[0]

    def kill() -> None:
        ray.kill(ray.get_actor(victim.actor_name, namespace=SERVE_NAMESPACE), no_restart=True)

    killed_at = asyncio.run(with_load(load, kill, settle_s=20, warm_s=3.0))
    counts, failed = load.counts(), load.failed()
    across = [o for o in load.outcomes if o.sent_at < killed_at < o.ended_at]
    # Each failure: sent and ended, in seconds from the kill, and whether its stream had begun.
    print(counts, f"{len(across)} in flight at the kill",
          [(round(o.sent_at - killed_at, 3), round(o.ended_at - killed_at, 3), o.started,
            o.error) for o in failed])
    assert len(across) >= CONCURRENCY // 2, "the kill did not happen under load"
    assert all(o.started for o in failed), [o for o in failed if not o.started][:3]
    assert all(o.sent_at <= killed_at + 1.0 for o in failed), failed[:3]
    settled = load.counts(since=killed_at + 5.0)
    assert settled["sent"] > 0 and settled["succeeded"] == settled["sent"], settled
    _wait_for_ingress_replicas(2)  # Serve replaced it
    _wait_until_every_block_is_free()
