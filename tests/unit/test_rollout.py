"""The rollout's decisions: canary share of new requests, roll back on the error rate (also
before the window ends), promote after the window, and only the winner gets requests after."""

from __future__ import annotations

from pagedserve.cluster.rollout import CANARY, STABLE, Rollout


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _rollout(clock: Clock) -> Rollout:
    return Rollout(canary_share=0.2, max_error_rate=0.03, window_s=10.0, min_requests=5,
                   clock=clock)


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
