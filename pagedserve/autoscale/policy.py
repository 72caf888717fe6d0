"""The autoscaling decision as a pure function: `decide(signals, state, config) -> (target, state)`.

No Ray here, so the policy is tested by replaying traces tick by tick (`serve_policy` adapts it to
Serve's custom autoscaling policy hook).

- Up, at once: when requests are queued and the work ahead of them would miss the TTFT target
  (the oldest has waited a good part of it, recent TTFTs already miss it, or KV is nearly full),
  ask for enough replicas to run everything that is running or queued, and at least one more.
  While a replica is still starting, ask for more only if the need grew beyond the pending target.
- Down, slowly: only after the load would fit in one replica fewer at `scale_down_utilization`,
  continuously for `scale_down_after_s`, and as long after the last scale-up; one replica at a time.
  The gap between the two conditions is the hysteresis that keeps the count from flapping.
- Never below `min_replicas` (the warm minimum) nor above `max_replicas`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pagedserve.config import AutoscaleConfig


@dataclass(frozen=True)
class Signals:
    """What the policy sees at one tick."""

    now: float  # seconds, any monotonic origin
    current_replicas: int  # running replicas
    target_replicas: int  # the previous decision (replicas may still be starting)
    queue_len: int  # requests waiting for admission (router queue plus Serve handle queues)
    oldest_wait_s: float  # how long the head of the router queue has waited
    num_running: int  # sequences running or waiting inside all replicas' engines
    max_kv_usage: float  # the fullest replica's fraction of KV blocks in use
    recent_ttft_s: float  # worst recent time to first token seen by a replica
    running_per_replica: int  # sequences one replica runs well


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between ticks."""

    low_since: float | None = None  # when the load last dropped below the scale-down level
    last_scale_up: float | None = None
    last_scale_down: float | None = None


def decide(signals: Signals, state: PolicyState,
           config: AutoscaleConfig) -> tuple[int, PolicyState]:
    """The number of replicas to run now, and the state for the next tick."""
    target = max(signals.target_replicas, config.min_replicas)
    if _breaches_ttft(signals, config):
        wanted = max(signals.current_replicas + 1, _replicas_needed(signals))
        new_target = _clamp(max(target, wanted), config)
        if new_target > signals.target_replicas:
            return new_target, replace(state, low_since=None, last_scale_up=signals.now)
        return new_target, replace(state, low_since=None)
    if not _is_low(signals, target, config):
        return _clamp(target, config), replace(state, low_since=None)
    low_since = state.low_since if state.low_since is not None else signals.now
    waited = signals.now - low_since >= config.scale_down_after_s
    since_up = signals.now - (state.last_scale_up if state.last_scale_up is not None else -math.inf)
    if waited and since_up >= config.scale_down_after_s and target > config.min_replicas:
        # Restart the clock: the next replica goes only after another quiet period.
        return target - 1, replace(state, low_since=signals.now, last_scale_down=signals.now)
    return _clamp(target, config), replace(state, low_since=low_since)


def scale_reason(s: Signals, new_target: int, config: AutoscaleConfig) -> str:
    """Why `decide` moved the target from `s.target_replicas` to `new_target`, for metrics."""
    if new_target > s.target_replicas:
        return _breach(s, config) or "min_replicas"
    return "max_replicas" if s.target_replicas > config.max_replicas else "low_load"


def _breaches_ttft(s: Signals, config: AutoscaleConfig) -> bool:
    return _breach(s, config) is not None


def _breach(s: Signals, config: AutoscaleConfig) -> str | None:
    """Which signal says queued work would miss the TTFT target; None when none does."""
    if s.queue_len <= 0:
        return None
    if s.current_replicas == 0:
        return "no_replica"  # nobody can serve the queue: the first request waits for one
    if s.oldest_wait_s >= config.ttft_target_s * config.queue_wait_fraction:
        return "queue_wait"
    if s.recent_ttft_s > config.ttft_target_s:
        return "ttft"
    return "kv_usage" if s.max_kv_usage >= config.kv_high_watermark else None


def _replicas_needed(s: Signals) -> int:
    return math.ceil((s.num_running + s.queue_len) / max(1, s.running_per_replica))


def _is_low(s: Signals, target: int, config: AutoscaleConfig) -> bool:
    if s.queue_len > 0 or target <= 0:
        return False
    room_after = (target - 1) * s.running_per_replica * config.scale_down_utilization
    return s.num_running <= room_after and s.max_kv_usage < config.kv_high_watermark / 2


def _clamp(target: int, config: AutoscaleConfig) -> int:
    return max(config.min_replicas, min(config.max_replicas, target))
