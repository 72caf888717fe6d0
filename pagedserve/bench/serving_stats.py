"""What a serving run measured: arrivals, latency percentiles and throughput (no I/O here)."""

from __future__ import annotations

import numpy as np

from pagedserve.bench.serving_client import Outcome

PERCENTILES = (50, 90, 99)


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of `n` requests arriving at `rate` per second on
    average, with exponential gaps; `inf` sends them all at once."""
    if n <= 0:
        return []
    if rate == float("inf"):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return [float(x) for x in np.cumsum(gaps) - gaps[0]]


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.error is None]
    wall = (max(o.end for o in ok) - min(o.sent for o in ok)) if ok else 0.0
    tokens = sum(o.output_tokens for o in ok)
    ttft = [o.first_token - o.sent for o in ok if o.first_token]
    tpot = [(o.end - o.first_token) / (o.output_tokens - 1)
            for o in ok if o.first_token and o.output_tokens > 1]
    e2e = [o.end - o.sent for o in ok]
    lag = [o.sent - o.scheduled for o in outcomes if o.scheduled is not None]
    return {"requests": len(outcomes), "errors": len(outcomes) - len(ok),
            "achieved_rate_per_s": arrival_rate([o.sent for o in outcomes]),
            "send_lag_s": percentiles(lag),
            "first_errors": [o.error for o in outcomes if o.error][:3],
            "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "e2e_s": percentiles(e2e)}


def arrival_rate(sent: list[float]) -> float:
    """Requests sent per second between the first send and the last (inf: all at once)."""
    if len(sent) < 2:
        return 0.0
    span = max(sent) - min(sent)
    return (len(sent) - 1) / span if span > 0 else float("inf")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": float(np.mean(values)),
            **{f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}}
