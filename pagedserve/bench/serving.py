"""`pagedserve bench serving`: load a running server the way users do and measure it.

Streaming `/v1/completions` clients send random token-id prompts (`ignore_eos`, fixed output
length) at Poisson arrival times; the run prints TTFT, time per output token and end-to-end
latency percentiles plus throughput, and writes a JSON file and a PNG of the latency
distributions. Needs only the package (and matplotlib for the PNG), not the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from pagedserve.bench.serving_client import run_jobs
from pagedserve.bench.serving_stats import poisson_offsets, summarize
from pagedserve.cli_chat import api_key_from_env

LOWEST_TOKEN_ID = 10  # clear of the special tokens at the start of most vocabularies


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="the model name (default: the first /v1/models lists)")
    p.add_argument("--api-key", default=api_key_from_env(),
                   help="sent as a bearer token (default: $PAGEDSERVE_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-token-id", type=int, default=500,
                   help="prompt token ids are drawn below this (must be in the vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("pagedserve-bench"),
                   help="directory for serving.json and serving.png")


def run(args: argparse.Namespace) -> dict:
    """The whole run: check the arguments, load the server, report; returns the summary."""
    _check(args)
    url = args.url.rstrip("/")
    model = args.model or _first_model(url, args.api_key)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(LOWEST_TOKEN_ID, args.max_token_id, (args.num_prompts, args.input_len))
    offsets = poisson_offsets(args.num_prompts, args.request_rate, args.seed)
    jobs = [(offsets[i], [int(t) for t in prompts[i]], args.output_len)
            for i in range(args.num_prompts)]
    outcomes = asyncio.run(run_jobs(url, model, jobs, time.time() + 0.5, args.api_key))
    summary = summarize(outcomes)
    result = {"benchmark": "serving", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "host": platform.node(), "url": url, "model": model,
              "workload": {k: getattr(args, k) for k in ("num_prompts", "input_len",
                                                          "output_len", "request_rate", "seed")},
              **summary}
    print(report(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(outcomes, args.out / "serving.png")
    print(f"wrote {args.out / 'serving.json'}" + (f" and {png}" if png else
                                                  " (pip install matplotlib for the PNG)"))
    return result


def _check(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_token_id <= LOWEST_TOKEN_ID:
        raise ValueError(f"--max-token-id must be above {LOWEST_TOKEN_ID}")
    if not args.url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {args.url!r}")


def _first_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as err:
        raise ValueError(f"cannot reach the server at {url} ({type(err).__name__})") from None
    if response.status_code != 200:
        raise ValueError(f"{url}/v1/models answered HTTP {response.status_code}")
    return response.json()["data"][0]["id"]


def report(summary: dict) -> str:
    lines = [f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end-to-end")):
        row = summary[key]
        if row:
            lines.append(f"{label:<14}" + "".join(f"{row[c] * 1000:>10.1f}"
                                                  for c in ("mean", "p50", "p90", "p99")))
    lines.append(f"{summary['requests']} requests, {summary['errors']} errors, "
                 f"{summary['output_tokens']} output tokens in {summary['wall_s']:.2f} s: "
                 f"{summary['tokens_per_s']:.1f} tok/s, {summary['requests_per_s']:.2f} req/s")
    lines += [f"error: {e}" for e in summary["first_errors"]]
    return "\n".join(lines)


def plot(outcomes, path: Path) -> Path | None:
    """Cumulative distributions of TTFT and end-to-end latency; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [o for o in outcomes if o.error is None]
    series = {"TTFT": [o.first_token - o.sent for o in ok if o.first_token],
              "end-to-end": [o.end - o.sent for o in ok]}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        values = np.sort(values)
        ax.step(values, np.arange(1, len(values) + 1) / max(1, len(values)), label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
