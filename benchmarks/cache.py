"""Response cache latency over HTTP: hits against misses of the same requests, unary and streamed.

    python benchmarks/cache.py                       # starts redis-server and ray_configs/gateway.yaml
    python benchmarks/cache.py --url http://127.0.0.1:8000 --api-key sk-...   # a running gateway

Every prompt is sent once as a miss (the model generates it), then `--repeats` more times as
hits, one request at a time so the numbers are latencies, not queueing. Streamed requests use
their own prompts, so their misses are real generations too. Each request is timed end to end
on the client (for streams also to the first content chunk) and its `x-pagedserve-cache` header
says whether it was a hit (and `x-pagedserve-cache-level` from which level). `GET /healthz`
(no key, no work), `GET /v1/models` (the key check and request bucket only) and a POST of a
body that is not JSON (the key check, reading the body from Serve's proxy, a 400) give the floor
that Serve's HTTP proxy and the ingress put under every hit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

try:
    from benchmarks import common
    from benchmarks.serving import ENV, REPO, stop_server
except ModuleNotFoundError:  # run as `python benchmarks/cache.py`
    import common
    from serving import ENV, REPO, stop_server

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-team-a-change-me"  # ray_configs/gateway.yaml's first key
TOPICS = ["the sea", "mountains", "a city at night", "rain", "bread", "trains", "libraries",
          "autumn", "bees", "the moon", "rivers", "chess", "snow", "markets", "bridges",
          "gardens", "clocks", "lighthouses", "deserts", "violins"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "ray_configs" / "gateway.yaml")
    p.add_argument("--url", help="drive this running gateway instead of starting one")
    p.add_argument("--api-key", default=KEY)
    p.add_argument("--prompts", type=int, default=12, help="distinct prompts per kind")
    p.add_argument("--repeats", type=int, default=10, help="hits per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, log: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    raise SystemExit(f"redis-server did not start:\n{log.read_text()}")


def start_gateway(config: Path, tmp: Path, redis_url: str) -> tuple[subprocess.Popen, str]:
    """`serve run` of the config with its HTTP port and Redis address replaced."""
    spec = yaml.safe_load(config.read_text())
    port = free_port()
    spec["http_options"]["port"] = port
    args = spec["applications"][0]["args"]
    args["cache"]["redis_url"] = redis_url
    if args.get("auth", {}).get("redis_url"):
        args["auth"]["redis_url"] = redis_url
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)],
                            cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve run exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit("gateway not ready after 900 s")


def body(topic: str, salt: str, max_tokens: int, stream: bool) -> dict:
    request = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": f"Write about {topic}. ({salt})"}]}
    if stream:
        request.update(stream=True, stream_options={"include_usage": True})
    return request


def timed_unary(client: httpx.Client, request: dict) -> dict:
    start = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=request)
    end = time.perf_counter()
    reply.raise_for_status()
    return {"e2e_s": end - start, "cache": reply.headers.get("x-pagedserve-cache"),
            "level": reply.headers.get("x-pagedserve-cache-level"),
            "text": reply.json()["choices"][0]["message"]["content"]}


def timed_stream(client: httpx.Client, request: dict) -> dict:
    start = time.perf_counter()
    first, parts = None, []
    with client.stream("POST", "/v1/chat/completions", json=request) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
        headers = reply.headers
    end = time.perf_counter()
    return {"e2e_s": end - start, "ttft_s": (first or end) - start,
            "cache": headers.get("x-pagedserve-cache"),
            "level": headers.get("x-pagedserve-cache-level"), "text": "".join(parts)}


def measure(client: httpx.Client, args: argparse.Namespace, stream: bool, salt: str) -> dict:
    send = timed_stream if stream else timed_unary
    misses, hits, mismatched = [], [], 0
    for topic in (TOPICS * ((args.prompts // len(TOPICS)) + 1))[:args.prompts]:
        request = body(topic, f"{salt} {len(misses)}", args.max_tokens, stream)
        miss = send(client, request)
        misses.append(miss)
        for _ in range(args.repeats):
            hit = send(client, request)
            hits.append(hit)
            mismatched += hit["text"] != miss["text"]
    return {"miss": misses, "hit": hits, "mismatched_texts": mismatched}


def floor(client: httpx.Client, path: str, n: int, body: bytes | None = None,
          status: int = 200) -> list[dict]:
    """GET `path` (POST `body` when given) n times, expecting `status`: the HTTP round trip
    through Serve's proxy with (next to) no work in the ingress."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        if body is None:
            reply = client.get(path)
        else:
            reply = client.post(path, content=body, headers={"content-type": "application/json"})
        samples.append({"e2e_s": time.perf_counter() - start, "cache": None, "level": None})
        if reply.status_code != status:
            raise SystemExit(f"{path}: {reply.status_code} where {status} was expected")
    return samples


def percentiles(values: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) * 1000 for q in (50, 90, 99)}


def summarize(kind: str, runs: dict) -> list[dict]:
    rows = []
    for label in ("miss", "hit"):
        samples = runs[label]
        row = {"requests": f"{kind} {label}", "n": len(samples),
               "said_hit": sum(s["cache"] == "hit" for s in samples),
               "l2": sum(s["level"] == "l2" for s in samples),
               **{f"e2e_{k}": v for k, v in percentiles([s["e2e_s"] for s in samples]).items()}}
        if "ttft_s" in samples[0]:
            row.update({f"ttft_{k}": v for k, v in
                        percentiles([s["ttft_s"] for s in samples]).items()})
        rows.append(row)
    return rows


def run(args: argparse.Namespace, url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"}
    salt = f"run {time.time_ns()}"  # a rerun against the same Redis starts with misses again
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        timed_unary(client, body("warm-up", salt, 4, False))  # connections and first request
        unary = measure(client, args, stream=False, salt=f"{salt} unary")
        streamed = measure(client, args, stream=True, salt=f"{salt} stream")
        floors = {"GET /healthz": floor(client, "/healthz", 100),
                  "GET /v1/models": floor(client, "/v1/models", 100),
                  # the key check, then the body's read from the proxy, then a 400
                  "POST bad JSON": floor(client, "/v1/chat/completions", 100, b"{", 400)}
    rows = summarize("unary", unary) + summarize("stream", streamed)
    for label, samples in floors.items():  # the floor under any hit: proxy, ingress, key check
        rows.append({"requests": label, "n": len(samples), "said_hit": 0, "l2": 0,
                     **{f"e2e_{k}": v for k, v in
                        percentiles([s["e2e_s"] for s in samples]).items()}})
    return {"rows": rows, "mismatched_texts": unary["mismatched_texts"]
            + streamed["mismatched_texts"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.url:
            measured = run(args, args.url)
        else:
            redis_port = free_port()
            redis = start_redis(redis_port, tmp / "redis.log")
            try:
                server, url = start_gateway(args.config, tmp, f"redis://127.0.0.1:{redis_port}/0")
                try:
                    measured = run(args, url)
                finally:
                    stop_server(server)
            finally:
                redis.terminate()
                redis.wait(timeout=10)
    columns = [("requests", "requests", "s"), ("n", "n", "d"), ("said_hit", "hit hdr", "d"),
               ("l2", "from L2", "d"), ("e2e_p50", "e2e p50 ms", ".1f"),
               ("e2e_p90", "p90", ".1f"), ("e2e_p99", "p99", ".1f")]
    rows = [{**r, **{k: r.get(k) for k, _, _ in columns}} for r in measured["rows"]]
    print(common.format_table(rows, columns))
    for r in rows:
        if "ttft_p50" in r:
            print(f"{r['requests']}: time to first content p50 {r['ttft_p50']:.1f} ms")
    print(f"hits whose text differed from the miss: {measured['mismatched_texts']}")
    result = {"benchmark": "cache", "environment": common.environment("cpu"),
              "config": str(args.config) if not args.url else args.url,
              "workload": {"prompts_per_kind": args.prompts, "repeats": args.repeats,
                           "max_tokens": args.max_tokens, "temperature": 0},
              **measured}
    out = common.default_out("cache", "cpu", args.out)
    bars = {r["requests"]: r["e2e_p50"] for r in rows}
    common.write_results(result, out, bars, "end-to-end p50 (ms)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
