"""Streaming HTTP clients for the serving benchmarks: one asyncio loop per process.

Each request is a streamed `/v1/completions` call with token-id prompts and `ignore_eos`, sent at
its scheduled time (Poisson arrivals are drawn by the parent); it records when it was sent, when
its first token arrived, when it ended and how many tokens it got (from the usage chunk).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    sent: float
    first_token: float | None
    end: float
    output_tokens: int
    error: str | None = None


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
               max_tokens: int) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.time()
    first, tokens, error = None, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                    if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                        first = time.time()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        error = repr(err)
    return Outcome(sent, first, time.time(), tokens, error)


async def run_jobs(url: str, model: str, jobs: list[tuple[float, list[int], int]],
                   start_at: float, api_key: str | None = None) -> list[Outcome]:
    """Send each `(offset s, prompt ids, max tokens)` job at `start_at + offset`; outcomes in
    job order. `api_key`: sent as `Authorization: Bearer`."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits,
                                 headers=headers) as client:
        async def scheduled(offset: float, prompt: list[int], max_tokens: int) -> Outcome:
            await asyncio.sleep(max(0.0, start_at + offset - time.time()))
            return await _one(client, url, model, prompt, max_tokens)

        return await asyncio.gather(*(scheduled(*job) for job in jobs))


def run_client(args: tuple) -> list[Outcome]:
    """Process entry point: `(url, model, jobs, start_at)` -> outcomes in job order."""
    url, model, jobs, start_at = args
    return asyncio.run(run_jobs(url, model, jobs, start_at))
