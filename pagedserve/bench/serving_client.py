"""Streaming HTTP clients for the serving benchmarks: one asyncio loop per process.

Each request is a streamed `/v1/completions` call with token-id prompts and `ignore_eos`, sent at
its scheduled time (Poisson arrivals are drawn by the parent); it records when it was scheduled
and sent, when its first token arrived, when it ended and how many tokens it got (from the usage
chunk). `run_client_processes` spreads the jobs over client processes that start together: each
opens its connection pool, then all wait at a barrier for one common start time, and each
reports the CPU time it spent, so a run can show that its clients were not the limit.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from dataclasses import dataclass

import httpx

from pagedserve.cluster.openai_sse import sse_data


@dataclass
class Outcome:
    sent: float
    first_token: float | None
    end: float
    output_tokens: int
    error: str | None = None
    scheduled: float | None = None  # when it was due to be sent (sent - scheduled: client lag)


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
                    if (chunk := sse_data(line)) is None:
                        continue
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                    if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                        first = time.time()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as err:
        error = repr(err)
    return Outcome(sent, first, time.time(), tokens, error)


Job = tuple[float, list[int], int]  # (offset s from the start, prompt ids, max tokens)


STALL_TIMEOUT_S = 600.0  # a request that gets no byte for this long ends with an error


def _http_client(api_key: str | None, stall_timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.AsyncClient(timeout=httpx.Timeout(stall_timeout_s), limits=limits,
                             headers=headers)


async def _send_all(client: httpx.AsyncClient, url: str, model: str, jobs: list[Job],
                    start_at: float) -> list[Outcome]:
    async def scheduled(offset: float, prompt: list[int], max_tokens: int) -> Outcome:
        await asyncio.sleep(max(0.0, start_at + offset - time.time()))
        outcome = await _one(client, url, model, prompt, max_tokens)
        outcome.scheduled = start_at + offset
        return outcome

    return await asyncio.gather(*(scheduled(*job) for job in jobs))


async def run_jobs(url: str, model: str, jobs: list[Job], start_at: float,
                   api_key: str | None = None,
                   stall_timeout_s: float = STALL_TIMEOUT_S) -> list[Outcome]:
    """Send each `(offset s, prompt ids, max tokens)` job at `start_at + offset`; outcomes in
    job order. `api_key`: sent as `Authorization: Bearer`; a request that receives nothing
    for `stall_timeout_s` ends with an error (a stuck request never holds a run)."""
    async with _http_client(api_key, stall_timeout_s) as client:
        return await _send_all(client, url, model, jobs, start_at)


@dataclass
class ClientRun:
    """What one client process did: its outcomes (job order) and the CPU seconds it spent
    from the common start to its last response."""

    outcomes: list[Outcome]
    cpu_s: float


def _client_process(url: str, model: str, jobs: list[Job], api_key: str | None,
                    stall_timeout_s: float, ready, go, start, results, index: int) -> None:
    async def main() -> ClientRun:
        async with _http_client(api_key, stall_timeout_s) as client:
            ready.wait()  # this process is up, its imports done and its client open
            go.wait()  # the parent has set the start time
            cpu = time.process_time()
            outcomes = await _send_all(client, url, model, jobs, start.value)
            return ClientRun(outcomes, time.process_time() - cpu)

    results.put((index, asyncio.run(main())))


def run_client_processes(url: str, model: str, shards: list[list[Job]],
                         api_key: str | None = None, lead_s: float = 0.05,
                         timeout_s: float = 3600.0,
                         stall_timeout_s: float = STALL_TIMEOUT_S) -> tuple[list[ClientRun], float]:
    """One process per shard, all started at one time once every process is ready; returns
    each process's run (shard order) and the common start time (epoch seconds). A request that
    receives nothing for `stall_timeout_s` ends with an error."""
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Barrier(len(shards) + 1), ctx.Barrier(len(shards) + 1)
    start, results = ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(url, model, shard, api_key, stall_timeout_s, ready, go, start,
                               results, i))
             for i, shard in enumerate(shards)]
    for proc in procs:
        proc.start()
    try:
        ready.wait(timeout=600)  # BrokenBarrierError if a client could not start
        start.value = time.time() + lead_s
        go.wait(timeout=60)
        runs = _collect(results, procs, time.monotonic() + timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return runs, start.value


def _collect(results, procs, deadline: float) -> list[ClientRun]:
    runs: dict[int, ClientRun] = {}
    while len(runs) < len(procs):
        try:
            index, run = results.get(timeout=1.0)
            runs[index] = run
        except queue.Empty:
            dead = [p for i, p in enumerate(procs) if i not in runs and not p.is_alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"a client process ended without results (exit code "
                                   f"{dead[0].exitcode if dead else 'none: timed out'})") from None
    return [runs[i] for i in range(len(procs))]
