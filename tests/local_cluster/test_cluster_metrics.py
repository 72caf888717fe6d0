"""The ingress's `/metrics` is cluster-wide on a multi-node cluster.

Two raylets on this machine (`ray.cluster_utils.Cluster`), each with its own metrics agent and
export port: the head with no CPUs (Serve's controller and proxy, the router and the ingress),
and a worker node with the one replica. The replica's series are in the worker's export only
and the ingress's in the head's; `/metrics` on the ingress serves both.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
import ray
from ray import serve
from ray_clusters import own_node_cluster

from pagedserve.cluster.app import APP_NAME, build_app
from pagedserve.cluster.node_exports import export_urls
from pagedserve.replicas.parallel.rendezvous import free_port

pytestmark = pytest.mark.slow

TIMEOUT_S = 120
REPLICA_SERIES = re.compile(r'^ray_pagedserve_engine_steps_total\{[^}]*deployment="Replica"', re.M)
INGRESS_SERIES = re.compile(r'^ray_pagedserve_requests_total\{[^}]*deployment="Ingress"', re.M)


@pytest.fixture(scope="module")
def served(tiny_model_factory):
    args = {"engine": {"model": str(tiny_model_factory("llama-gqa-tied")), "device": "cpu",
                       "dtype": "float32", "num_kvcache_blocks": 32, "max_num_seqs": 2},
            "served_model_name": "tiny", "num_replicas": 1, "replica_num_cpus": 1,
            "torch_threads": 1, "control_resources": {"node:__internal_head__": 0.001}}
    port = free_port()
    with own_node_cluster(head_cpus=0) as nodes:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The replica waits for a CPU, then starts on the worker node.
        serve._run(build_app(args), name=APP_NAME, route_prefix="/", _blocking=False)  # noqa: SLF001
        nodes.add_node(num_cpus=1)
        base_url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _get(f"{base_url}/readyz").status_code == 200, "a ready replica")
        yield base_url


def _get(url: str) -> httpx.Response:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return httpx.Response(599)


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def test_metrics_serves_the_series_of_every_node(served):
    body = {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{served}/v1/completions", json=body, timeout=120).status_code == 200
    urls = export_urls(ray.nodes())
    assert len(urls) == 2, urls  # the head's agent and the worker's
    # Each node's agent exports its own processes: the replica's series on one, the ingress's
    # on the other (after the agents' next export rounds).
    def split_by_node() -> bool:
        texts = [_get(url).text for url in urls]
        return sorted((bool(REPLICA_SERIES.search(t)), bool(INGRESS_SERIES.search(t)))
                      for t in texts) == [(False, True), (True, False)]

    _wait_for(split_by_node, "the replica's and the ingress's series, each on its node")
    text = _get(f"{served}/metrics").text
    assert REPLICA_SERIES.search(text) and INGRESS_SERIES.search(text), text[-3000:]
    assert "not answering" not in text
