"""Autoscaling on a real local Ray cluster: burst -> 2 replicas -> back to the warm minimum of 1.

The cluster is this test's own (`ray.init` + Serve on a free HTTP port; handles only), and only
it is shut down at the end. While the deployment scales down, a stream pinned to the replica
Serve removes must complete, and requests sent through the app meanwhile must succeed.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import ray
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import APP_NAME, build_app
from pagedserve.replicas.parallel.rendezvous import free_port
from pagedserve.sampling_params import SamplingParams

SCALE_UP_TIMEOUT_S = 180
SCALE_DOWN_TIMEOUT_S = 120
LONG_TOKENS = 400


def _args(model) -> dict:
    return {
        "served_model_name": "tiny", "replica_num_cpus": 1, "torch_threads": 1,
        "engine": {"model": str(model), "device": "cpu", "dtype": "float32",
                   "num_kvcache_blocks": 128, "max_num_seqs": 2},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "ttft_target_s": 1.0,
                        "queue_wait_fraction": 0.3, "running_per_replica": 4,
                        "scale_down_after_s": 4.0, "look_back_period_s": 1.0,
                        "metrics_interval_s": 0.25, "membership_poll_s": 0.2,
                        "graceful_shutdown_timeout_s": 60},
        "weight_store": {"max_gib": 1.0},
    }


@pytest.fixture(scope="module")
def app(tiny_model_factory):
    with own_ray_cluster(num_cpus=4):
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_app(_args(tiny_model_factory("llama-gqa-tied"))), name=APP_NAME,
                  route_prefix="/")
        yield serve.get_app_handle(APP_NAME)


def replica_states() -> list[tuple[str, str, float]]:
    """`(replica id, state, start time)` of the replica deployment, oldest first."""
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_deployment_details.remote(APP_NAME, "Replica"))
    rows = [(r.replica_id, str(getattr(r.state, "value", r.state)), r.start_time_s or 0.0)
            for r in details.replicas]
    return sorted(rows, key=lambda r: r[2])


def running_ids() -> list[str]:
    return [rid for rid, state, _ in replica_states() if state == "RUNNING"]


async def completion(handle, max_tokens: int = 64) -> int:
    body = {"model": "tiny", "prompt": "w5 w9 w11 w40", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    usage = None
    async for chunk in handle.options(stream=True).completions.remote(body):
        usage = chunk.get("usage") or usage
    return usage["completion_tokens"]


async def pinned_stream(replica_id: str, tokens: int) -> tuple[int, float, float]:
    """A stream sent straight to one replica (the pinned request router honours the target)."""
    replicas = serve.get_deployment_handle("Replica", APP_NAME).options(stream=True)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    started, count = time.monotonic(), 0
    async for delta in replicas.generate.remote([5, 9, 11, 40], params, uuid.uuid4().hex,
                                                target_replica=replica_id):
        count += len(delta.outputs[0].token_ids)
        await asyncio.sleep(0.002)  # a slow reader keeps the call open a little longer
    return count, started, time.monotonic()


async def burst_until_two_replicas(handle) -> list[int]:
    stop = asyncio.Event()

    async def worker() -> list[int]:
        done = []
        while not stop.is_set():
            done.append(await completion(handle, max_tokens=200))
        return done

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    deadline = time.monotonic() + SCALE_UP_TIMEOUT_S
    while len(running_ids()) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    stop.set()
    return [n for result in await asyncio.gather(*workers) for n in result]


async def scale_down_under_traffic(handle) -> dict:
    """Keep one stream at a time on the newest replica and send app requests until back to 1."""
    newest = running_ids()[-1]
    pinned, sent, min_running = [], [], 2
    stopped_at = None
    deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S

    async def pin_loop():
        while stopped_at is None and time.monotonic() < deadline:
            pinned.append(await pinned_stream(newest, LONG_TOKENS))

    async def send_loop():
        while time.monotonic() < deadline and (stopped_at is None or len(running_ids()) > 1
                                               or any(s == "STOPPING"
                                                      for _, s, _ in replica_states())):
            sent.append(await completion(handle, max_tokens=8))
            await asyncio.sleep(0.3)

    tasks = [asyncio.create_task(pin_loop()), asyncio.create_task(send_loop())]
    while not all(t.done() for t in tasks):
        states = replica_states()
        min_running = min(min_running, sum(1 for _, s, _ in states if s == "RUNNING"))
        if stopped_at is None and any(r == newest and s == "STOPPING" for r, s, _ in states):
            stopped_at = time.monotonic()
        await asyncio.sleep(0.1)
    for task in tasks:
        task.result()  # any failed request fails the test here
    return {"newest": newest, "pinned": pinned, "sent": sent, "stopped_at": stopped_at,
            "min_running": min_running}


def test_burst_scales_to_two_then_back_to_one_with_streams_finishing(app):
    assert len(running_ids()) == 1  # the warm minimum, ready before any traffic

    burst = asyncio.run(burst_until_two_replicas(app))
    assert len(running_ids()) == 2, "the burst did not scale the deployment to 2 replicas"
    assert burst and all(n == 200 for n in burst)

    result = asyncio.run(scale_down_under_traffic(app))
    assert result["stopped_at"] is not None, "the newest replica was not removed"
    assert running_ids() == [rid for rid in running_ids() if rid != result["newest"]]
    assert len(running_ids()) == 1 and result["min_running"] >= 1
    across = [p for p in result["pinned"] if p[1] < result["stopped_at"] < p[2]]
    assert across, "no stream was running on the removed replica when it began to stop"
    assert all(count == LONG_TOKENS for count, _, _ in result["pinned"])
    assert result["sent"] and all(n == 8 for n in result["sent"])

    time.sleep(6)  # well past scale_down_after_s: the warm minimum stays
    assert len(running_ids()) == 1
