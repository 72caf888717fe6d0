"""Soak: the served default model at a fixed share of its capacity for a bounded time.

    python benchmarks/soak.py                      # CPU, ray_configs/local.yaml, 10 minutes
    python benchmarks/soak.py --minutes 2 --share 0.5

It starts its own local Ray cluster and the app of the config (Serve handles, no HTTP port),
measures capacity first (completed requests per second with `--concurrency` closed-loop
clients), then sends Poisson arrivals at `--share` of that rate for `--minutes`. It reports
errors, p99 latency per minute, the RSS of every process of the cluster after the first
minute and at the end (the first minute holds one-off growth: caches, lazy imports), and the
replicas' free KV blocks at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import yaml
from ray import serve

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as `python benchmarks/soak.py`
    import common

from pagedserve.cluster.app import build_app

REPO = Path(__file__).resolve().parents[1]
APP = "pagedserve-soak"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "ray_configs" / "local.yaml")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--share", type=float, default=0.5, help="of the measured capacity")
    p.add_argument("--capacity-s", type=float, default=45.0, help="how long capacity is measured")
    p.add_argument("--concurrency", type=int, default=4, help="clients while measuring capacity")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=2, help="of the local Ray cluster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.out = common.default_out("soak", "cpu", args.out)
    return args


def app_args(config: Path) -> dict:
    return yaml.safe_load(config.read_text())["applications"][0].get("args", {})


def request_body(rng: random.Random, max_tokens: int) -> dict:
    """A short chat-like prompt, different every time (so the prefix cache does not do it all)."""
    words = " ".join(rng.choice(("tell", "me", "about", "the", "sea", "a", "story", "why",
                                 "cats", "sleep", "so", "much", "in", "winter"))
                     for _ in range(rng.randint(8, 40)))
    return {"prompt": words, "max_tokens": max_tokens, "temperature": 0.7,
            "seed": rng.randint(0, 1 << 30), "ignore_eos": True, "stream": True}


async def one_request(handle, body: dict, log: list) -> None:
    sent, error, tokens = time.monotonic(), None, 0
    try:
        async for chunk in handle.options(stream=True).completions.remote(body):
            tokens += 1 if chunk.get("choices") else 0
    except Exception as err:  # noqa: BLE001 (counted and reported)
        error = f"{type(err).__name__}: {str(err)[-200:]}"
    log.append({"sent": sent, "end": time.monotonic(), "chunks": tokens, "error": error})


async def measure_capacity(handle, args, rng: random.Random) -> float:
    log: list = []
    deadline = time.monotonic() + args.capacity_s

    async def client() -> None:
        while time.monotonic() < deadline:
            await one_request(handle, request_body(rng, args.max_tokens), log)

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    ok = [r for r in log if r["error"] is None]
    return len(ok) / args.capacity_s


async def soak(handle, args, rate: float, rng: random.Random, on_minute) -> list:
    """Poisson arrivals at `rate` for `args.minutes`; calls `on_minute(i)` after each minute."""
    log: list = []
    tasks = set()
    start = time.monotonic()
    end = start + args.minutes * 60
    next_at, minute = start, 1
    while (now := time.monotonic()) < end:
        if now >= start + minute * 60:
            on_minute(minute)
            minute += 1
        if now >= next_at:
            task = asyncio.create_task(one_request(handle, request_body(rng, args.max_tokens), log))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, min(next_at, start + minute * 60) - time.monotonic()))
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    for r in log:
        r["minute"] = int((r["sent"] - start) // 60)
    return log


def cluster_processes() -> dict[int, str]:
    """Every process of the local cluster (this driver's descendants), by pid: its name."""
    me = psutil.Process(os.getpid())
    names = {}
    for proc in me.children(recursive=True):
        try:
            name = " ".join(proc.cmdline())
            if "multiprocessing" in name:  # an engine process or a TP rank: name its parent
                name = f"{' '.join(proc.parent().cmdline())[:60]} / child"
            names[proc.pid] = name[:90]
        except psutil.Error:
            continue
    return names


def rss_mib(pids) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def rss_growth(names: dict[int, str], first: dict[int, float], last: dict[int, float]) -> list:
    rows = []
    for pid, before in sorted(first.items()):
        if pid in last:
            rows.append({"pid": pid, "process": names.get(pid, "?"), "rss_mib_after_1min": before,
                         "rss_mib_end": last[pid],
                         "growth": (last[pid] - before) / before if before else 0.0})
    return rows


def per_minute(log: list) -> list:
    rows = []
    for minute in sorted({r["minute"] for r in log}):
        lat = [r["end"] - r["sent"] for r in log if r["minute"] == minute and r["error"] is None]
        rows.append({"minute": minute, "requests": sum(r["minute"] == minute for r in log),
                     "errors": sum(r["minute"] == minute and r["error"] is not None for r in log),
                     "p50_s": float(np.percentile(lat, 50)) if lat else None,
                     "p99_s": float(np.percentile(lat, 99)) if lat else None})
    return rows


def replica_blocks() -> dict:
    stats = serve.get_deployment_handle("Replica", APP).stats.remote().result(timeout_s=60)
    return {"num_free_blocks": stats["num_free_blocks"],
            "num_total_blocks": stats["num_total_blocks"], "num_running": stats["num_running"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="warning")
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(app_args(args.config)), name=APP, route_prefix=None)
        handle = serve.get_app_handle(APP)
        capacity = asyncio.run(measure_capacity(handle, args, rng))
        rate = capacity * args.share
        print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for "
              f"{args.minutes:g} min")
        names: dict[int, str] = {}
        samples: dict[str, dict[int, float]] = {}

        def on_minute(minute: int) -> None:
            if minute == 1:
                names.update(cluster_processes())
                samples["after_1min"] = rss_mib(names)
            print(f"minute {minute} done")

        log = asyncio.run(soak(handle, args, rate, rng, on_minute))
        samples["end"] = rss_mib(names)
        time.sleep(3)  # the replica's last report
        blocks = replica_blocks()
    finally:
        serve.shutdown()
        ray.shutdown()
    errors = [r["error"] for r in log if r["error"] is not None]
    growth = rss_growth(names, samples.get("after_1min", {}), samples["end"])
    result = {"benchmark": "soak", **common.environment("cpu"), "config": str(args.config),
              "minutes": args.minutes, "share": args.share, "capacity_req_s": capacity,
              "rate_req_s": rate, "max_tokens": args.max_tokens, "requests": len(log),
              "errors": len(errors), "first_errors": errors[:3], "per_minute": per_minute(log),
              "rss": growth, "max_rss_growth": max((g["growth"] for g in growth), default=None),
              "blocks_at_end": blocks}
    print(common.format_table(result["per_minute"], [
        ("minute", "minute", "d"), ("requests", "requests", "d"), ("errors", "errors", "d"),
        ("p50_s", "p50 (s)", ".3f"), ("p99_s", "p99 (s)", ".3f")]))
    print(common.format_table(growth, [
        ("process", "process", "s"), ("pid", "pid", "d"), ("rss_mib_after_1min", "RSS 1 min", ".1f"),
        ("rss_mib_end", "RSS end", ".1f"), ("growth", "growth", ".2%")]))
    print(f"{len(log)} requests, {len(errors)} errors; blocks at end: {blocks}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
