"""End to end through Serve and HTTP: from a burst that needs one more replica to its first token.

Each path is one Serve application on the running Ray cluster (autoscaling 1 to 2 serving
replicas, metrics every 0.1 s, no Serve delays):
- `parked`: one parked replica; the router un-parks it when the burst's last request fits on no
  serving one (no replica starts);
- `standby_device` / `standby_host` / `object_store` / `disk`: Serve starts a second replica,
  which adopts a standby of that mode, or an `imported` standby that loads from the weight
  store, or spawns an engine that reads the files. The node keeps a warm Ray worker for it
  (`standby.warm_workers`), ready before each burst.
A burst is `max_num_seqs + 1` streamed completions sent at once: the first replica takes
`max_num_seqs`; the last waits for new capacity. Its time from the burst's first request to its
first token is `burst_to_first_token_s`. The burst is then cut short and the application waits
until it is back at one serving replica before the next repeat.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import ray
from ray import serve

from pagedserve.cluster.app import APP_NAME, build_app
from pagedserve.cluster.openai_sse import sse_data
from pagedserve.replicas.node.warm_workers import idle_workers
from pagedserve.replicas.parallel.rendezvous import free_port

SETTLE_TIMEOUT_S = 300.0
BURST_TOKENS = 4096  # long enough that the first replica stays full until the burst is cut
BURST_TIMEOUT_S = 180.0  # every request of a burst has its first token by then, or it failed


STORE_PATHS = ("object_store", "standby_host")  # a host standby maps the node's weight store


def standby_mode(path: str) -> str | None:
    """The standby engines a path's node keeps (None: a new replica spawns its engine)."""
    if path == "object_store":
        return "imported"
    return path.removeprefix("standby_") if path.startswith("standby_") else None


def app_args(engine: dict, path: str, torch_threads: int | None, num_gpus: float,
             max_gib: float) -> dict:
    args = {
        "engine": engine, "torch_threads": torch_threads, "replica_num_gpus": num_gpus,
        "served_model_name": "bench", "warm_prefixes": {"top_k": 0},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "ttft_target_s": 0.2,
                        "queue_wait_fraction": 0.5, "scale_down_after_s": 2.0,
                        "look_back_period_s": 0.3, "metrics_interval_s": 0.1,
                        "membership_poll_s": 0.1, "graceful_shutdown_timeout_s": 5},
        "weight_store": {"enabled": path in STORE_PATHS, "max_gib": max_gib},
    }
    if path == "parked":
        args["standby"] = {"parked": 1}
    elif standby_mode(path):
        args["standby"] = {"per_node": 1, "mode": standby_mode(path)}
    return args


_PORT: list[int] = []  # Serve's HTTP options are fixed at its first start in a cluster


def run_path(path: str, args: dict, repeats: int, prompt: list[int]) -> dict:
    """Deploy the path's app, run `repeats` bursts, return the figures."""
    if not _PORT:
        _PORT.append(free_port())
    port = _PORT[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    burst_size = args["engine"]["max_num_seqs"] + 1
    try:
        _wait_for_serving(1, standby="per_node" in args.get("standby", {}))
        bursts = []
        for _ in range(repeats):
            bursts.append(asyncio.run(asyncio.wait_for(_burst(url, prompt, burst_size),
                                                       BURST_TIMEOUT_S)))
            print(f"  burst: {bursts[-1]['burst_to_first_token_s']:.2f} s "
                  f"(first tokens at {[round(t, 2) for t in bursts[-1]['first_tokens_s']]})",
                  flush=True)
            _wait_for_serving(1, standby="per_node" in args.get("standby", {}))
    finally:
        serve.delete(APP_NAME)
    values = [b["burst_to_first_token_s"] for b in bursts]
    return {"bursts": bursts, "burst_to_first_token_s": statistics.median(values),
            "burst_to_first_token_all_s": values}


async def _burst(url: str, prompt: list[int], size: int) -> dict:
    """Send `size` long streams at once; return when every one has its first token."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    firsts: list[float] = []
    everyone = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        started = time.time()
        tasks = [asyncio.ensure_future(_stream(client, url, prompt, firsts, everyone, size))
                 for _ in range(size)]
        waiter = asyncio.ensure_future(everyone.wait())
        pending = {waiter, *tasks}
        # Until every stream has its first token, or one fails (FIRST_EXCEPTION alone would
        # also wait for the streams to end: thousands of tokens on a CPU).
        while not waiter.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t is not waiter and (t.cancelled() or t.exception()) for t in done):
                break
        waiter.cancel()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)
              and not isinstance(r, asyncio.CancelledError)]
    if errors or len(firsts) < size:
        raise RuntimeError(f"burst failed: {errors[:1]!r}, {len(firsts)}/{size} first tokens")
    return {"burst_to_first_token_s": max(firsts) - started,
            "first_tokens_s": sorted(f - started for f in firsts), "size": size}


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int], firsts: list[float],
                  everyone: asyncio.Event, size: int) -> None:
    """One streamed completion: note its first token's time, then read on until cancelled."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": BURST_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        got_first = False
        async for line in response.aiter_lines():
            chunk = None if got_first else sse_data(line)
            if chunk is not None and any(c.get("text") for c in chunk.get("choices", [])):
                got_first = True
                firsts.append(time.time())
                if len(firsts) == size:
                    everyone.set()


def _wait_for_serving(count: int, standby: bool) -> None:
    """Until the router has exactly `count` serving replicas, nothing running, and (with
    standby engines) a standby ready again; then until a warm Ray worker is idle."""
    router = serve.get_deployment_handle("Router", APP_NAME)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = router.stats.remote().result()
        serving = [r for r in stats["replicas"].values() if not r["parked"]]
        idle = all(r["num_running"] == 0 for r in stats["replicas"].values())
        if len(serving) == count and idle and (not standby or _standby_ready()):
            wait_warm_worker()
            return
        time.sleep(0.2)
    raise TimeoutError(f"the application did not settle at {count} serving replica(s)")


def wait_warm_worker(timeout_s: float = 60.0) -> bool:
    """Until this node has an idle warm Ray worker of this driver's job (Serve's replicas are
    of it too); False, said, if none came in time (the next start then makes a new worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if idle_workers() >= 1:
            return True
        time.sleep(0.2)
    print(f"  no warm Ray worker on the node after {timeout_s:.0f} s", flush=True)
    return False


def _standby_ready() -> bool:
    from pagedserve.replicas.node.services import STANDBY_POOL, find

    pool = find(APP_NAME, ray.get_runtime_context().get_node_id(), STANDBY_POOL)
    return pool is not None and ray.get(pool.stats.remote())["ready"] >= 1
