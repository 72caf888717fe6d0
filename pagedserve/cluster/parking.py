"""Which replicas serve and which are parked: warm, RUNNING, and admitted nothing. No Ray here.

Parked replicas are capacity that Serve already runs. Un-parking one is a decision of the
router alone, so new capacity serves as soon as the router needs it (no replica start, no
Serve round trip): the admission queue un-parks one the moment the head of the queue fits on
no serving replica but would fit on a parked one. Serve's target count is the serving count
plus `parked`; when it shrinks, the router parks the least-loaded serving replica (a drain: no
new admissions, its streams finish), never one it un-parked less than `hold_s` ago, so a burst's
extra replica is not parked again before the autoscaler has seen it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Parking:
    """The parked set of one replica deployment and the serving count the router aims at."""

    def __init__(self, parked: int, serving_target: int, hold_s: float,
                 clock: Callable[[], float]) -> None:
        if parked < 0 or serving_target < 0:
            raise ValueError(f"parked ({parked}) and serving_target ({serving_target}) must be "
                             ">= 0")
        self.num_parked = parked
        self.serving_target = serving_target
        self.hold_s = hold_s
        self.clock = clock
        self.parked: set[str] = set()
        self._unparked_at: dict[str, float] = {}
        self.num_unparked = 0  # un-parks so far, for metrics

    @property
    def enabled(self) -> bool:
        return self.num_parked > 0

    def is_parked(self, replica_id: str) -> bool:
        return replica_id in self.parked

    def place_new(self, replica_id: str, serving_ids: Iterable[str]) -> None:
        """A replica the router has not seen before: it serves if serving is short, else parks."""
        if self.enabled and sum(1 for _ in serving_ids) >= self.serving_target:
            self.parked.add(replica_id)

    def unpark(self, replica_id: str) -> None:
        if replica_id in self.parked:
            self.parked.discard(replica_id)
            self._unparked_at[replica_id] = self.clock()
            self.num_unparked += 1

    def forget(self, replica_id: str) -> None:
        self.parked.discard(replica_id)
        self._unparked_at.pop(replica_id, None)

    def set_deployment_target(self, total_target: int) -> None:
        """Serve's target for the deployment: serving replicas plus the parked ones."""
        self.serving_target = max(0, total_target - self.num_parked)

    def rebalance(self, loads: dict[str, int]) -> None:
        """Bring the serving count to the target: un-park when short, park the idlest when over.

        `loads`: every live replica's load (running + waiting + reserved), parked ones included.
        """
        if not self.enabled:
            return
        for gone in self.parked - loads.keys():
            self.forget(gone)
        serving = [rid for rid in loads if rid not in self.parked]
        parked = sorted(self.parked, key=loads.__getitem__)
        while len(serving) < self.serving_target and parked:
            rid = parked.pop(0)
            self.unpark(rid)
            serving.append(rid)
        now = self.clock()
        held = [rid for rid in serving if now - self._unparked_at.get(rid, -float("inf"))
                < self.hold_s]
        movable = sorted((rid for rid in serving if rid not in held), key=loads.__getitem__)
        # A replica un-parked for a burst counts on top of the target until its hold ends:
        # Serve's target (what the autoscaler saw) lags the un-park by a tick or more.
        while len(serving) > self.serving_target + len(held) and movable:
            rid = movable.pop(0)
            self.parked.add(rid)
            serving.remove(rid)
