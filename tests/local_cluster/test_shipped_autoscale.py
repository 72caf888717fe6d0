"""`serve run ray_configs/autoscale.yaml` exactly as shipped: a burst of 24 concurrent 256-token
completions scales the serving replicas 1 -> 2, no Serve log shows a traceback, and after the
burst the deployment settles back at 1 (never 0).

The config is the user's (port 8000, the YAML's own autoscaling values); the test only joins
the cluster as a second driver to read the router's view and the logs.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
import ray
from ray import serve
from ray_clusters import leave_ray_cluster
from serve_cli import REPO, serve_run
from serve_logs import logs_dir, serve_tracebacks

BASE_URL = "http://127.0.0.1:8000"
BURST, TOKENS = 24, 256
SCALE_UP_TIMEOUT_S, SETTLE_TIMEOUT_S = 240, 240


def serving_replicas() -> int:
    router = serve.get_deployment_handle("Router", "pagedserve")
    stats = router.stats.remote().result()
    return sum(1 for r in stats["replicas"].values() if not r["parked"] and not r["draining"])


async def burst() -> list[int]:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Tell me about the sea.",
            "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=900) as client:
        replies = await asyncio.gather(*(client.post(f"{BASE_URL}/v1/completions", json=body)
                                         for _ in range(BURST)))
    return [r.status_code for r in replies]


@pytest.mark.integration
def test_shipped_autoscale_config_scales_up_and_back_to_one(tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 is in use; the shipped config serves there")
    with serve_run(REPO / "ray_configs" / "autoscale.yaml", BASE_URL, tmp_path / "serve.log"):
        ray.init(address="auto", logging_level="warning", log_to_driver=False)
        try:
            logs = logs_dir()
            assert serving_replicas() == 1
            loop = asyncio.new_event_loop()
            sent = loop.create_task(burst())
            peak, deadline = 1, time.monotonic() + SCALE_UP_TIMEOUT_S
            while not sent.done() and time.monotonic() < deadline:
                loop.run_until_complete(asyncio.sleep(0.5))
                peak = max(peak, serving_replicas())
            statuses = loop.run_until_complete(sent)
            loop.close()
            assert statuses == [200] * BURST
            assert peak == 2, "the burst did not bring a second serving replica"
            counts, deadline = [], time.monotonic() + SETTLE_TIMEOUT_S
            while time.monotonic() < deadline:
                counts.append(serving_replicas())
                if counts[-1] == 1 and len(counts) > 1 and counts[-2] == 1:
                    break
                time.sleep(2)
            assert counts[-1] == 1 and min(counts) >= 1, counts
            assert serve_tracebacks(logs) == []
        finally:
            leave_ray_cluster()
