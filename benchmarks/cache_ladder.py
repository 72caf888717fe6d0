"""Where a cache hit's time goes over HTTP: requests that each add one step, sent in interleaved
rounds so every kind sees the same machine load.

    python benchmarks/cache_ladder.py [--config ray_configs/gateway.yaml] [--rounds 200]

Rungs: `GET /healthz` (Serve's proxy and the hop to an ingress replica), `GET /v1/models` (+ the
key check), a POST whose body is not JSON (+ reading the body from the proxy, a 400), a unary
hit (+ parsing, chat template, key, L1 lookup, response), a streamed hit (+ SSE). Then hits by
their position right after a miss (does the miss's generation slow the hits that follow it?).
The config's rate limits are raised for the run, since every rung but the first takes a request.
With `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` in the environment the ladder is also climbed against
the first ingress replica's own HTTP port, bypassing the proxy.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from pagedserve.bench.serve_process import free_port

try:
    from benchmarks import cache, common
    from benchmarks.gateway_server import start_gateway, start_redis
    from benchmarks.serving import REPO, stop_server
except ModuleNotFoundError:  # run as `python benchmarks/cache_ladder.py`
    import cache
    import common
    from gateway_server import start_gateway, start_redis
    from serving import REPO, stop_server

DIRECT_PORT = re.compile(r"Successfully started \S*HTTP server on port (\d+)")


def rungs(client: httpx.Client, unary: dict, stream: dict) -> dict:
    return {
        "GET /healthz": lambda: client.get("/healthz"),
        "GET /v1/models": lambda: client.get("/v1/models"),
        "POST bad JSON (400)": lambda: client.post(
            "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}),
        "POST hit unary": lambda: client.post("/v1/chat/completions", json=unary),
        "POST hit stream": lambda: cache.timed_stream(client, stream),
    }


def climb(url: str, rounds: int) -> dict:
    headers = {"Authorization": f"Bearer {cache.KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        salt = f"ladder {time.time_ns()}"
        unary = cache.body("the sea", salt, 64, False)
        stream = cache.body("the sea", salt + " stream", 64, True)
        cache.timed_unary(client, unary)  # the misses that fill the cache
        cache.timed_stream(client, stream)
        kinds = rungs(client, unary, stream)
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(rounds):
            for kind, send in kinds.items():
                start = time.perf_counter()
                send()
                samples[kind].append(time.perf_counter() - start)
        result = {k: cache.percentiles(v) for k, v in samples.items()}
        by_position: list[list[float]] = [[] for _ in range(10)]
        for i in range(6):
            request = cache.body("rain", f"{salt} after {i}", 64, False)
            cache.timed_unary(client, request)
            for position in by_position:
                position.append(cache.timed_unary(client, request)["e2e_s"])
        result["hit p50 by position after its miss"] = [
            round(cache.percentiles(v)["p50"], 2) for v in by_position]
    return result


def direct_ports() -> list[int]:
    ports = set()
    for path in glob.glob("/tmp/ray/session_latest/logs/serve/replica_*_Ingress_*.log"):
        ports |= {int(p) for p in DIRECT_PORT.findall(Path(path).read_text())}
    return sorted(ports)


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "ray_configs" / "gateway.yaml")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        spec = yaml.safe_load(args.config.read_text())
        spec["applications"][0]["args"]["auth"]["rate_limit"] = {
            "requests_per_min": 10**6, "tokens_per_min": 10**9}
        config = tmp / "ladder.yaml"
        config.write_text(yaml.safe_dump(spec))
        redis_port = free_port()
        redis = start_redis(redis_port, tmp / "redis.log")
        try:
            server, url = start_gateway(config, tmp, f"redis://127.0.0.1:{redis_port}/0")
            try:
                result = {"load_before": os.getloadavg(), "proxy": climb(url, args.rounds)}
                ports = direct_ports() if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") else []
                if ports:
                    result[f"direct :{ports[0]}"] = climb(f"http://127.0.0.1:{ports[0]}",
                                                          args.rounds)
                result["load_after"] = os.getloadavg()
            finally:
                stop_server(server)
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    result = {"benchmark": "cache_ladder", "environment": common.environment("cpu"),
              "rounds": args.rounds, **result}
    print(json.dumps(result, indent=1))
    out = common.default_out("cache-ladder", "cpu", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
