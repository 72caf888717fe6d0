"""The router's side of a rollout: the pure `Rollout` plus its log line and metrics.

The decision is logged once (Serve's logger, so it reaches the router's log file) and
exported as `pagedserve_rollout_state` (0 judging, 1 promoted, -1 rolled back) and
`pagedserve_rollout_requests` by version and outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from pagedserve.cluster.rollout import CANARY, Rollout
from pagedserve.metric_list import serve_metric

logger = logging.getLogger("ray.serve")

STATE_VALUES = {"canary": 0.0, "promoted": 1.0, "rolled_back": -1.0}


class RolloutWatch:
    """Chooses versions for new requests and records their outcomes, for the router."""

    def __init__(self, rollout: dict) -> None:
        """`rollout`: `Rollout` arguments plus `key`, the `versions_key` of its two versions."""
        rollout = dict(rollout)
        self.key = rollout.pop("key", None)
        self.rollout = Rollout(clock=time.monotonic, **rollout)
        self._state = serve_metric("rollout_state")
        self._requests = serve_metric("rollout_requests")
        self._state.set(0.0)

    def version_for_new_request(self, replicas: Iterable) -> str:
        """`replicas`: the router's `ReplicaState`s (is a canary replica ready?)."""
        ready = any(s.report.version == CANARY and not s.report.draining for s in replicas)
        return self.rollout.version_for_new_request(ready)

    def record(self, version: str, ok: bool, ttft_s: float | None) -> str | None:
        """Count one finished request; returns the decision when this one took it."""
        self._requests.inc(tags={"version": version, "outcome": "ok" if ok else "error"})
        return self._announce(self.rollout.record(version, ok, ttft_s))

    def adopt(self, decided: dict | None) -> str | None:
        """A replica's word of a decision taken before this router started (the last router
        told it, as `decided` gave it): the rollout is not judged again, if the decision is
        about the same two versions. Returns the decision if it is news."""
        if not decided or decided.get("key") != self.key:
            return None
        return self._announce(self.rollout.adopt(decided.get("state")))

    @property
    def decided(self) -> dict | None:
        """The decision once taken, for the replicas to keep and tell the next router."""
        if self.rollout.winner is None:
            return None
        return {"state": self.rollout.state, "key": self.key}

    def _announce(self, decision: str | None) -> str | None:
        if decision is not None:
            self._state.set(STATE_VALUES[decision])
            logger.warning("rollout %s: %s", decision, self.rollout.summary())
        return decision

    def lost(self, version: str) -> bool:
        """Whether `version` lost the rollout (its replicas drain, then stop)."""
        return self.rollout.loser == version

    @property
    def winner(self) -> str | None:
        return self.rollout.winner

    @property
    def loser(self) -> str | None:
        return self.rollout.loser

    def summary(self) -> dict:
        return self.rollout.summary()
