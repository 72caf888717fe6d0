"""A replica's engine metrics, registered from `pagedserve.metric_list`.

Gauges show the engine's last snapshot; counters (preemptions, prefix-cache tokens, steps and
step time) follow the engine's running totals, so Prometheus's `rate()` gives hit rates and mean
step times over any window.
"""

from __future__ import annotations

from pagedserve.metric_list import serve_metrics_for
from pagedserve.replicas.engine.engine_stats import EngineStats

# counter name -> the EngineStats running total it follows
_TOTALS = {"preemptions": "num_preemptions",
           "prefix_cache_hit_tokens": "num_prefix_hit_tokens",
           "prefix_cache_queried_tokens": "num_prefix_queried_tokens",
           "engine_steps": "num_steps", "engine_step_seconds": "step_seconds"}


class ReplicaMetrics:
    """Records one engine's snapshots as the replica's gauges and counters."""

    def __init__(self) -> None:
        metrics = serve_metrics_for("replica")
        self._metrics = {k: v for k, v in metrics.items() if not k.startswith("replica_start")}
        self._last = dict.fromkeys(_TOTALS, 0.0)

    def record(self, stats: EngineStats) -> None:
        m = self._metrics
        m["replica_running"].set(stats.num_running)
        m["replica_waiting"].set(stats.num_waiting)
        m["replica_free_blocks"].set(stats.num_free_blocks)
        m["replica_kv_usage"].set(1.0 - stats.num_free_blocks / max(1, stats.num_total_blocks))
        for name, field in _TOTALS.items():
            total = float(getattr(stats, field))
            if total > self._last[name]:  # a total that went back (engine reset) adds nothing
                m[name].inc(total - self._last[name])
            self._last[name] = total
