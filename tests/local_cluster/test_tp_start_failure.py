"""A Serve tensor-parallel replica whose rank 1 dies while starting: deploying the app fails
within 60 s with an error naming the rank and its error, rather than waiting at the rendezvous.

Runs its own small local Ray cluster (Serve without HTTP). The fault is injected through the
environment, which the cluster's workers (so the rank actors) inherit from this driver.
"""

from __future__ import annotations

import time

import pytest
from ray import serve
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import build_app

pytestmark = pytest.mark.slow

BOUND_S = 60.0
FAULT = "PAGEDSERVE_TP_START_FAULT"


def test_serve_tp_replica_start_failure_raises(tiny_llama, monkeypatch):
    monkeypatch.setenv(FAULT, "1")
    args = {"engine": {"model": str(tiny_llama), "device": "cpu", "tensor_parallel_size": 2,
                       "num_kvcache_blocks": 64, "max_num_seqs": 4},
            "served_model_name": "tiny", "replica_num_cpus": 1, "torch_threads": 1,
            "warmup": False}
    with own_ray_cluster(num_cpus=4):
        serve.start(proxy_location="Disabled")
        started = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            serve.run(build_app(args), name="pagedserve-tp-start-failure", route_prefix=None)
        took = time.monotonic() - started
        status = serve.status().applications["pagedserve-tp-start-failure"]
        replica = status.deployments["Replica"]
    assert "Failed to update the deployments ['Replica']" in str(failed.value)
    assert replica.status == "DEPLOY_FAILED", replica
    # Serve tried three times; each attempt failed on the rank's own error, not a timeout.
    assert replica.message.strip().splitlines()[-1] == (
        "RuntimeError: the engine could not start: tensor-parallel rank 1 failed: RuntimeError: "
        f"start-up fault injected into tensor-parallel rank 1 ({FAULT}=1)"), replica.message
    assert took < BOUND_S, took
