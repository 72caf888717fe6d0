"""The autoscaling policy replayed on synthetic traces (steady, burst, ramp, idle), tick by tick.

A small simulator stands in for the cluster: requests arrive each tick, each replica runs up to
`PER_REPLICA` of them at once for `SERVICE_TICKS` ticks, the rest wait in the router queue, and a
replica the policy asks for starts serving `START_TICKS` ticks later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest

from pagedserve.autoscale.policy import PolicyState, Signals, decide
from pagedserve.config import AutoscaleConfig

TICK_S = 0.5
PER_REPLICA = 4
SERVICE_TICKS = 4
START_TICKS = 6
CONFIG = AutoscaleConfig(min_replicas=1, max_replicas=4, ttft_target_s=2.0, queue_wait_fraction=0.5,
                         scale_down_after_s=10.0, running_per_replica=PER_REPLICA)


@dataclass
class Cluster:
    """Replicas, their running requests (ticks left) and the queue (arrival ticks)."""

    replicas: int = 1
    starting: list[int] = field(default_factory=list)  # ticks until each new replica serves
    running: list[int] = field(default_factory=list)
    queue: deque = field(default_factory=deque)

    def step(self, tick: int, arrivals: int, target: int) -> None:
        self.starting = [t - 1 for t in self.starting]
        self.replicas += sum(1 for t in self.starting if t <= 0)
        self.starting = [t for t in self.starting if t > 0]
        pending = self.replicas + len(self.starting)
        if target > pending:
            self.starting += [START_TICKS] * (target - pending)
        elif target < pending:  # drop starting ones first, as Serve does
            drop = pending - target
            while drop and self.starting:
                self.starting.pop()
                drop -= 1
            self.replicas -= drop
        self.running = [t - 1 for t in self.running if t > 1]
        self.queue.extend([tick] * arrivals)
        while self.queue and len(self.running) < self.replicas * PER_REPLICA:
            self.queue.popleft()
            self.running.append(SERVICE_TICKS)

    def signals(self, tick: int, target: int) -> Signals:
        capacity = max(1, self.replicas * PER_REPLICA)
        return Signals(
            now=tick * TICK_S, current_replicas=self.replicas, target_replicas=target,
            queue_len=len(self.queue),
            oldest_wait_s=(tick - self.queue[0]) * TICK_S if self.queue else 0.0,
            num_running=len(self.running), max_kv_usage=min(1.0, len(self.running) / capacity / 2),
            recent_ttft_s=0.0, running_per_replica=PER_REPLICA)


def replay(arrivals: list[int], config: AutoscaleConfig = CONFIG,
           replicas: int = 1) -> tuple[list[int], list[int]]:
    """Run the trace; return the target after each tick and the running replicas at each tick."""
    cluster, state, target = Cluster(replicas=replicas), PolicyState(), replicas
    targets, running = [], []
    for tick, count in enumerate(arrivals):
        target, state = decide(cluster.signals(tick, target), state, config)
        cluster.step(tick, count, target)
        targets.append(target)
        running.append(cluster.replicas)
    return targets, running


def direction_changes(targets: list[int]) -> int:
    steps = [b - a for a, b in zip(targets, targets[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(steps, steps[1:], strict=False) if (a > 0) != (b > 0))


def steady(ticks: int = 200) -> list[int]:
    return [1 if t % 2 == 0 else 0 for t in range(ticks)]  # ~2 running of 4 slots


def burst(start: int = 20, length: int = 30, ticks: int = 200) -> list[int]:
    return [4 if start <= t < start + length else (1 if t % 4 == 0 else 0) for t in range(ticks)]


def ramp(ticks: int = 160) -> list[int]:
    return [min(4, t // 30) for t in range(ticks)]


def test_steady_load_within_one_replica_keeps_one():
    targets, running = replay(steady())
    assert set(targets) == {1}
    assert min(running) == 1


def test_burst_scales_up_within_a_few_ticks_then_back_to_the_warm_minimum():
    trace = burst(start=20)
    targets, running = replay(trace)
    first_up = next(t for t, n in enumerate(targets) if n > 1)
    # The queue forms at tick 20; the oldest request crosses half the TTFT target (1 s) 2 ticks later.
    assert first_up - 20 <= 3
    assert max(targets) >= 3  # enough for the burst's 16 concurrent requests
    assert targets[-1] == 1 and min(targets) == 1 and min(running) >= 1
    assert direction_changes(targets) == 1  # up, then down: no flapping


def test_scale_down_is_slow_and_one_replica_at_a_time():
    targets, _ = replay(burst(start=20, length=30))
    downs = [t for t in range(1, len(targets)) if targets[t] < targets[t - 1]]
    assert all(targets[t - 1] - targets[t] == 1 for t in downs)
    gaps = [b - a for a, b in zip(downs, downs[1:], strict=False)]
    assert all(gap * TICK_S >= CONFIG.scale_down_after_s for gap in gaps)
    assert downs[0] >= 50 + CONFIG.scale_down_after_s / TICK_S  # the burst ends at tick 50


def test_ramp_only_grows_while_the_load_grows():
    targets, _ = replay(ramp())
    assert targets == sorted(targets)  # never down while the load only rises
    assert targets[-1] >= 3
    assert targets[-1] <= CONFIG.max_replicas


def test_idle_keeps_the_warm_minimum():
    targets, running = replay([0] * 300, replicas=3)
    assert targets[-1] == 1 and min(targets) == 1 and min(running) == 1


def test_min_zero_scales_to_zero_when_idle_and_back_for_the_first_request():
    config = CONFIG.model_copy(update={"min_replicas": 0})
    trace = [0] * 60 + [1] + [0] * 20
    targets, _ = replay(trace, config=config)
    assert targets[59] == 0
    assert targets[61] == 1  # the request queued at tick 60 asks for a replica at once


def test_never_above_max_replicas():
    targets, _ = replay([40] * 60)
    assert max(targets) == CONFIG.max_replicas


def test_bad_bounds_are_rejected():
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscaleConfig(min_replicas=3, max_replicas=2)
