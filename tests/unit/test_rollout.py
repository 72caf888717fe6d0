"""The rollout's decisions: canary share of new requests, roll back on the error rate (also
before the window ends) or on a TTFT regression (at the window's end), promote after the
window, and only the winner gets requests after."""

from __future__ import annotations

import pytest

from pagedserve.cluster.rollout import CANARY, STABLE, Rollout, VersionCounts, ttft_regressed


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _rollout(clock: Clock, **ttft) -> Rollout:
    return Rollout(canary_share=0.2, max_error_rate=0.03, window_s=10.0, min_requests=5,
                   clock=clock, **ttft)


def _serve(rollout: Rollout, clock: Clock, ttft_s: dict[str, float], seconds: float) -> list:
    """Send and finish one successful request every 0.1 s for `seconds`, each version with its
    own TTFT; returns the decisions seen."""
    decisions = []
    for _ in range(round(seconds * 10)):
        clock.now += 0.1
        version = rollout.version_for_new_request(canary_ready=True)
        decisions.append(rollout.record(version, ok=True, ttft_s=ttft_s[version]))
    return decisions


def test_canary_share_is_exact_over_a_run_and_needs_a_ready_canary():
    rollout = _rollout(Clock())
    assert rollout.version_for_new_request(canary_ready=False) == STABLE
    versions = [rollout.version_for_new_request(canary_ready=True) for _ in range(100)]
    assert versions.count(CANARY) == 20
    assert CANARY in versions[:5]  # spread evenly, not bunched at the end


def test_healthy_canary_is_promoted_after_the_window_then_takes_everything():
    clock = Clock()
    rollout = _rollout(clock)
    for _ in range(50):
        version = rollout.version_for_new_request(canary_ready=True)
        assert rollout.record(version, ok=True, ttft_s=0.1) is None
    clock.now = 10.0
    assert rollout.record(STABLE, ok=True) == "promoted"
    assert {rollout.version_for_new_request(canary_ready=True) for _ in range(10)} == {CANARY}
    assert rollout.summary()["state"] == "promoted"


def test_failing_canary_is_rolled_back_before_the_window_ends():
    clock = Clock()
    rollout = _rollout(clock)
    decisions = []
    for _ in range(40):
        clock.now += 0.1
        version = rollout.version_for_new_request(canary_ready=True)
        decisions.append(rollout.record(version, ok=version == STABLE))
    assert "rolled_back" in decisions and rollout.summary()["decided_after_s"] < 10.0
    assert {rollout.version_for_new_request(canary_ready=True) for _ in range(10)} == {STABLE}


def test_no_decision_without_enough_canary_requests():
    clock = Clock()
    rollout = _rollout(clock)
    rollout.version_for_new_request(canary_ready=True)
    rollout.record(CANARY, ok=False)  # one error in one request: 100 %, but too few to judge
    clock.now = 20.0
    assert rollout.decide() is None and rollout.state == "canary"


def test_a_canary_slower_to_first_token_is_rolled_back_at_the_window_end():
    clock = Clock()
    rollout = _rollout(clock, max_ttft_ratio=1.5, ttft_tolerance_s=0.05)
    decisions = _serve(rollout, clock, {STABLE: 0.2, CANARY: 0.5}, seconds=12)
    # Not before the window ends (its answers are right, only slow), but at its end.
    assert decisions.count("rolled_back") == 1 and rollout.summary()["decided_after_s"] >= 10
    assert rollout.reason == "ttft" and rollout.loser == CANARY and rollout.winner == STABLE
    assert rollout.version_for_new_request(canary_ready=True) == STABLE


def test_a_canary_as_fast_or_within_the_bounds_is_promoted():
    for canary_ttft in (0.2, 0.29, 0.1):  # equal, under 1.5x, faster
        clock = Clock()
        rollout = _rollout(clock, max_ttft_ratio=1.5, ttft_tolerance_s=0.05)
        assert "promoted" in _serve(rollout, clock, {STABLE: 0.2, CANARY: canary_ttft}, 12)
        assert rollout.reason == "healthy" and rollout.loser == STABLE


def test_ttft_within_the_tolerance_is_noise_and_none_turns_ttft_off():
    clock = Clock()
    rollout = _rollout(clock, max_ttft_ratio=1.5, ttft_tolerance_s=0.05)
    # 3x slower, but by 4 ms: a difference a loaded machine makes, not the model.
    assert "promoted" in _serve(rollout, clock, {STABLE: 0.002, CANARY: 0.006}, 12)
    clock = Clock()
    rollout = _rollout(clock, max_ttft_ratio=None)
    assert "promoted" in _serve(rollout, clock, {STABLE: 0.2, CANARY: 5.0}, 12)


@pytest.mark.parametrize(("canary", "stable", "regressed"), [
    ([0.5] * 5, [0.2] * 5, True),
    ([0.5] * 4, [0.2] * 5, False),  # too few canary samples to judge
    ([0.5] * 5, [0.2] * 4, False),  # too few of the old version's
    ([0.1, 0.1, 0.1, 9.0, 9.0], [0.2] * 5, False),  # a median: two outliers do not decide
    ([0.31] * 5, [0.2] * 5, True),
    ([0.3] * 5, [0.2] * 5, False),  # exactly 1.5x is within the bound
])
def test_ttft_regressed_compares_medians_with_enough_samples(canary, stable, regressed):
    assert ttft_regressed(VersionCounts(ttft_s=canary), VersionCounts(ttft_s=stable),
                          max_ratio=1.5, tolerance_s=0.05, min_samples=5) is regressed


def test_ttft_samples_stop_being_kept_once_decided():
    clock = Clock()
    rollout = _rollout(clock)
    _serve(rollout, clock, {STABLE: 0.2, CANARY: 0.2}, seconds=12)
    assert rollout.state == "promoted"
    kept, served = len(rollout.counts[CANARY].ttft_s), rollout.counts[CANARY].requests
    _serve(rollout, clock, {STABLE: 0.2, CANARY: 0.2}, seconds=10)
    assert len(rollout.counts[CANARY].ttft_s) == kept  # a router that runs for weeks
    assert rollout.counts[CANARY].requests == served + 100


def test_an_adopted_decision_holds_and_a_taken_one_is_not_overturned():
    rollout = _rollout(Clock())
    assert rollout.adopt("canary") is None and rollout.state == "canary"  # not a decision
    assert rollout.adopt("promoted") == "promoted" and rollout.reason == "adopted"
    assert rollout.version_for_new_request(canary_ready=False) == CANARY
    assert rollout.adopt("rolled_back") is None and rollout.state == "promoted"
