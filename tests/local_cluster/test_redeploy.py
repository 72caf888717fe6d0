"""A plain redeploy of a changed config (`serve run` / `serve deploy` of other weights) under
streaming load, on a real local Ray cluster and Serve (handles only, no HTTP port).

Args that change restart every deployment of the app (Serve's code version hashes them):
the ingress, the router actor and the replicas. Serve stops each old replica only after its
ongoing calls end (its graceful shutdown), so streams running at the redeploy finish on the
old replicas; requests that had not started wait for the new ones. No request may fail.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from fault_load import Load
from ray import serve
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import build_app

pytestmark = pytest.mark.slow

APP = "redeploy"
BODY = {"model": "tiny", "prompt": "w5 w6 w7 w8 w9", "max_tokens": 48, "temperature": 0,
        "ignore_eos": True}
CONCURRENCY = 8  # twice what the replica runs at once: some wait in the router
SETTLE_WITHIN_S = 90.0  # the old replicas' streams end, they stop, the new ones serve


def _args(model) -> dict:
    engine = {"model": str(model), "device": "cpu", "dtype": "float32",
              "num_kvcache_blocks": 64, "max_num_seqs": 4}
    return {"engine": engine, "served_model_name": "tiny", "replica_num_cpus": 1,
            "torch_threads": 1}


def _settled() -> bool:
    """Every deployment of the app runs only its new replicas (none starting or stopping)."""
    app = serve.status().applications[APP]
    return app.status == "RUNNING" and all(
        set(d.replica_states) == {"RUNNING"} for d in app.deployments.values())


def _router_replicas() -> set[str]:
    return set(serve.get_deployment_handle("Router", APP).stats.remote().result()["replicas"])


async def _redeploy_under_load(new_args: dict) -> tuple[Load, float, float]:
    """Load; after a second, deploy `new_args` over the app; keep the load going until the
    app settled and 2 s more. Returns the load, when the redeploy began and settled."""
    load = Load(serve.get_app_handle(APP), BODY, concurrency=CONCURRENCY)
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    await asyncio.sleep(1.0)
    redeployed_at = time.monotonic()
    await asyncio.to_thread(serve.run, build_app(new_args), name=APP, route_prefix=None)
    while not await asyncio.to_thread(_settled):
        assert time.monotonic() - redeployed_at < SETTLE_WITHIN_S, serve.status()
        await asyncio.sleep(0.2)
    settled_at = time.monotonic()
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.wait_for(running, 120)
    return load, redeployed_at, settled_at


def test_a_redeploy_with_other_weights_under_load_fails_no_request(tiny_model_factory):
    with own_ray_cluster(num_cpus=4):
        serve.start(proxy_location="Disabled")
        serve.run(build_app(_args(tiny_model_factory("llama-gqa-tied"))), name=APP,
                  route_prefix=None)
        old_replicas = _router_replicas()
        new_args = _args(tiny_model_factory("llama-gqa-tied-long"))  # same tokenizer
        load, redeployed_at, settled_at = asyncio.run(_redeploy_under_load(new_args))
        counts = load.counts()
        assert counts["sent"] > 0 and counts["succeeded"] == counts["sent"], \
            (counts, load.failed()[:3])
        # Streams were running when the redeploy began, and requests went on after it.
        assert any(o.sent_at < redeployed_at < o.ended_at for o in load.outcomes)
        assert load.counts(since=settled_at)["sent"] > 0
        new_replicas = _router_replicas()
        assert new_replicas and not new_replicas & old_replicas, (old_replicas, new_replicas)
        print(f"redeploy settled {settled_at - redeployed_at:.1f} s after it began; {counts}")
        serve.delete(APP)
