"""The engine's snapshot for routers, autoscalers and metrics (no torch: replicas import it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """A snapshot for routers, autoscalers and metrics."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    # Running totals since the engine's warm-up, for the metrics' counters.
    num_prefix_hit_tokens: int = 0
    num_prefix_queried_tokens: int = 0
    num_steps: int = 0
    step_seconds: float = 0.0
