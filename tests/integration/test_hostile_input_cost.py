"""Requests that were once 500s, or costly inside the engine, are refused in the ingress: the
engine's memory does not move and a normal request running beside them is not slowed.

The hostile set: a lone surrogate in a prompt and in a model name, 50,000-deep nesting in an
ignored field, a 3,000-deep nested prompt, and stop strings filling the body limit (16 stops
of 60,000 characters, which once cost the engine ~0.9 GB and seconds). Each must get an
OpenAI-shaped 4xx; meanwhile the engine process's RSS stays within 50 MB of its value before,
and a normal request sent at the same time takes at most 20 % longer than alone (medians of
interleaved runs).
"""

import asyncio
import json
import statistics
import time

import httpx
import psutil
import pytest

MODEL = "SmolLM2-135M-Instruct"
NORMAL = {"model": MODEL, "prompt": "The sea is", "max_tokens": 24, "temperature": 0,
          "ignore_eos": True}
HOSTILE = [
    b'{"model": "' + MODEL.encode() + b'", "prompt": "a\\udc00b"}',
    b'{"model": "\\ud800", "prompt": "Hi"}',
    b'{"model": "m", "prompt": "Hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"model": "m", "prompt": ' + b"[" * 3_000 + b"1" + b"]" * 3_000 + b"}",
    json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 8,
                "stop": [chr(0x4E00 + i) * 60_000 for i in range(16)]},
               ensure_ascii=False).encode()[: (1 << 20) - 1024],
]
ROUNDS = 5  # medians: one round slowed by something else on the machine does not decide
RSS_BOUND = 50 * 2**20
SLOWDOWN_BOUND = 1.2

pytestmark = pytest.mark.integration


def _engine_rss(ray_driver) -> int:
    from ray import serve

    stats = serve.get_deployment_handle("Replica", app_name="pagedserve").stats.remote().result()
    return psutil.Process(stats["engine_pid"]).memory_info().rss


async def _normal(client: httpx.AsyncClient, server: str) -> float:
    started = time.perf_counter()
    reply = await client.post(f"{server}/v1/completions", json=NORMAL)
    assert reply.status_code == 200, reply.text
    return time.perf_counter() - started


async def _hostile(client: httpx.AsyncClient, server: str) -> list[int]:
    statuses = []
    for body in HOSTILE:
        reply = await client.post(f"{server}/v1/completions", content=body,
                                  headers={"content-type": "application/json"})
        assert "error" in reply.json(), reply.text
        statuses.append(reply.status_code)
    return statuses


async def _rounds(server: str) -> tuple[list[float], list[float], list[list[int]]]:
    alone, beside, statuses = [], [], []
    async with httpx.AsyncClient(timeout=120) as client:
        await _normal(client, server)  # warm
        for _ in range(ROUNDS):
            alone.append(await _normal(client, server))
            took, answers = await asyncio.gather(_normal(client, server),
                                                 _hostile(client, server))
            beside.append(took)
            statuses.append(answers)
    return alone, beside, statuses


def test_hostile_requests_cost_the_engine_nothing(server, ray_driver):
    """The hostile bodies, each sent beside a normal request, round after round."""
    rss_before = _engine_rss(ray_driver)
    alone, beside, statuses = asyncio.run(_rounds(server))
    rss_after = _engine_rss(ray_driver)
    assert all(400 <= s < 500 for answers in statuses for s in answers), statuses
    assert abs(rss_after - rss_before) <= RSS_BOUND, (rss_before, rss_after)
    slowdown = statistics.median(beside) / statistics.median(alone)
    assert slowdown <= SLOWDOWN_BOUND, f"alone {alone}, beside the hostile requests {beside}"
