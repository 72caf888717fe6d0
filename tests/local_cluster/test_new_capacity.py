"""New capacity on a real local Ray cluster and Serve: parked replicas, warm prefixes, scale
from zero. One cluster, three applications (handles only; no HTTP port is needed).

- parked: one serving and one parked replica; a request that fits on no serving replica is
  admitted to the parked one at once, and Serve is then asked for a new parked replica.
- warm prefixes: after traffic with a hot 512-token prefix, a replica started by a scale-up
  prefills it before it reports ready, so its first request with that prefix finds it cached.
- scale from zero: with `min_replicas: 0` and no replica, a request waits and succeeds.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from ray import serve
from ray_clusters import own_ray_cluster

from pagedserve.cluster.app import build_app
from pagedserve.replicas.parallel.rendezvous import free_port
from pagedserve.sampling_params import SamplingParams

HOT = [(7 * i + 3) % 200 + 10 for i in range(512)]  # the hot prefix: 512 tokens, 32 blocks
TIMEOUT_S = 240


def _engine(model) -> dict:
    return {"model": str(model), "device": "cpu", "dtype": "float32", "num_kvcache_blocks": 160,
            "max_num_seqs": 2}


def _autoscaling(min_replicas: int) -> dict:
    return {"min_replicas": min_replicas, "max_replicas": 2, "ttft_target_s": 0.5,
            "queue_wait_fraction": 0.3, "scale_down_after_s": 3.0, "look_back_period_s": 0.5,
            "metrics_interval_s": 0.1, "membership_poll_s": 0.1,
            "graceful_shutdown_timeout_s": 20}


@pytest.fixture(scope="module")
def apps(tiny_model_factory):
    model = tiny_model_factory("llama-gqa-tied-long")
    common = {"served_model_name": "tiny", "replica_num_cpus": 0.5, "torch_threads": 1}
    configs = {
        # Autoscaled, so Serve can be asked for a parked replica behind the un-parked one (a
        # fixed-size deployment re-parks it after its hold instead); slow to scale down, so the
        # new replica is not taken back before it reports.
        "parked": {**common, "engine": _engine(model), "standby": {"parked": 1},
                   "autoscaling": {**_autoscaling(1), "scale_down_after_s": 120.0}},
        "warm": {**common, "engine": _engine(model), "autoscaling": _autoscaling(1)},
        "zero": {**common, "engine": _engine(model), "autoscaling": _autoscaling(0),
                 "warm_prefixes": {"top_k": 0}},
    }
    with own_ray_cluster(num_cpus=4):
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        for name, args in configs.items():
            serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        yield {name: serve.get_app_handle(name) for name in configs}


def router_stats(app: str) -> dict:
    return serve.get_deployment_handle("Router", app).stats.remote().result()


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


async def stream(handle, prompt: list[int], max_tokens: int, first_token: list) -> int:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async for chunk in handle.options(stream=True).completions.remote(body):
        if not first_token and any(c.get("text") for c in chunk.get("choices", [])):
            first_token.append(time.monotonic())
        usage = chunk.get("usage") or usage
    return usage["completion_tokens"]


def test_a_parked_replica_takes_the_request_no_serving_one_has_room(apps):
    stats = wait_for(lambda: (s := router_stats("parked")) and len(s["replicas"]) == 2 and s,
                     "two replicas reporting")
    assert sorted(r["parked"] for r in stats["replicas"].values()) == [False, True]

    async def burst():
        firsts = [[] for _ in range(3)]
        started = time.monotonic()
        tasks = [asyncio.create_task(stream(apps["parked"], [5, 9, 11, 40 + i], 120, firsts[i]))
                 for i in range(3)]  # one more than the serving replica's two slots
        counts = await asyncio.gather(*tasks)
        return counts, [f[0] - started for f in firsts]

    counts, firsts = asyncio.run(burst())
    assert counts == [120] * 3
    after = router_stats("parked")
    assert after["num_unparked"] == 1
    # The third request did not wait for the first two to finish (120 tokens each).
    assert max(firsts) < 5.0, firsts
    # Serve keeps one replica parked behind the serving ones: a third replica comes up.
    wait_for(lambda: sum(r["parked"] for r in router_stats("parked")["replicas"].values()) >= 1
             and len(router_stats("parked")["replicas"]) == 3, "a new parked replica")


async def pinned(app: str, replica_id: str, prompt: list[int]) -> tuple[list[int], int]:
    replicas = serve.get_deployment_handle("Replica", app).options(stream=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens, cached = [], 0
    async for delta in replicas.generate.remote(prompt, params, uuid.uuid4().hex,
                                                target_replica=replica_id):
        tokens += delta.outputs[0].token_ids
        cached = max(cached, delta.num_cached_tokens or 0)
    return tokens, cached


def test_a_scaled_up_replica_prefills_the_hot_prefix_before_ready(apps):
    first = wait_for(lambda: list(router_stats("warm")["replicas"]), "the first replica")[0]
    hot_prompts = [HOT + [300 + i, 301 + i] for i in range(4)]

    async def traffic_then_burst():
        for prompt in hot_prompts:  # the prefix becomes hot
            await stream(apps["warm"], prompt, 2, [])
        expected, _ = await pinned("warm", first, hot_prompts[0])
        stop = asyncio.Event()

        async def worker(i: int):
            while not stop.is_set():  # other prompts: the new replica learns HOT only by warm-up
                await stream(apps["warm"], [60 + i, 61, 62], 60, [])

        workers = [asyncio.create_task(worker(i)) for i in range(5)]
        await asyncio.to_thread(wait_for, lambda: len(router_stats("warm")["replicas"]) == 2,
                                "a second replica")
        stop.set()
        await asyncio.gather(*workers)
        return expected

    expected = asyncio.run(traffic_then_burst())
    new = next(rid for rid in router_stats("warm")["replicas"] if rid != first)
    tokens, cached = asyncio.run(pinned("warm", new, hot_prompts[0]))
    assert tokens == expected
    assert cached >= 0.9 * len(HOT), f"{cached} of the {len(HOT)} hot tokens were cached"


def test_scale_from_zero_waits_for_a_replica_and_succeeds(apps):
    wait_for(lambda: not router_stats("zero")["replicas"], "the deployment to sleep at 0",
             timeout_s=60)
    started = time.monotonic()
    count = asyncio.run(stream(apps["zero"], [5, 9, 11], 8, []))
    waited = time.monotonic() - started
    assert count == 8
    assert waited > 0.5  # it did wait for a replica to start (and got an answer)
