"""Rolling a new model version in by canary share, and the promote-or-roll-back decision.
No Ray here: the router asks `version_for_new_request()` for each new request and tells
`record()` how each one ended.

While the canary runs, `canary_share` of new requests go to the new version (spread evenly,
not at random, so a small window still sees its share). The new version is rolled back as
soon as its error rate over at least `min_requests` passes `max_error_rate` (also before the
window ends: a broken version is taken out at once), and promoted once `window_s` has passed
with its error rate at or under the bound, if it served `min_requests`. After the decision
every new request goes to the winner; the loser's replicas drain (no new admissions).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

STABLE, CANARY = "stable", "canary"


@dataclass
class VersionCounts:
    requests: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def summary(self) -> dict:
        ttfts = sorted(self.ttft_s)
        median = ttfts[len(ttfts) // 2] if ttfts else None
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.error_rate, 4), "median_ttft_s": median}


class Rollout:
    """The state of one rollout: "canary", then "promoted" or "rolled_back"."""

    def __init__(self, canary_share: float, max_error_rate: float, window_s: float,
                 min_requests: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.canary_share = canary_share
        self.max_error_rate = max_error_rate
        self.window_s = window_s
        self.min_requests = min_requests
        self.clock = clock
        self.state = "canary"
        self.started_at: float | None = None  # when the canary first took a request
        self.decided_at: float | None = None
        self.counts = {STABLE: VersionCounts(), CANARY: VersionCounts()}
        self._sent = 0
        self._sent_to_canary = 0

    def version_for_new_request(self, canary_ready: bool) -> str:
        """The version a new request goes to. Without a ready canary replica, the stable one."""
        if self.state == "promoted":
            return CANARY
        if self.state == "rolled_back" or not canary_ready:
            return STABLE
        if self.started_at is None:
            self.started_at = self.clock()
        self._sent += 1
        if self._sent_to_canary < self.canary_share * self._sent:
            self._sent_to_canary += 1
            return CANARY
        return STABLE

    def record(self, version: str, ok: bool, ttft_s: float | None = None) -> str | None:
        """Count one finished request; returns "promoted" or "rolled_back" when that decides."""
        counts = self.counts[version]
        counts.requests += 1
        counts.errors += 0 if ok else 1
        if ttft_s is not None:
            counts.ttft_s.append(ttft_s)
        return self.decide()

    def decide(self) -> str | None:
        """Take the decision if it is due (see the module's docstring); None while undecided."""
        if self.state != "canary" or self.started_at is None:
            return None
        canary = self.counts[CANARY]
        if canary.requests >= self.min_requests and canary.error_rate > self.max_error_rate:
            return self._settle("rolled_back")
        if self.clock() - self.started_at >= self.window_s and canary.requests >= self.min_requests:
            return self._settle("promoted")
        return None

    def summary(self) -> dict:
        return {"state": self.state, "canary_share": self.canary_share,
                "max_error_rate": self.max_error_rate, "window_s": self.window_s,
                "decided_after_s": (None if self.decided_at is None
                                    else round(self.decided_at - self.started_at, 3)),
                **{version: c.summary() for version, c in self.counts.items()}}

    def _settle(self, state: str) -> str:
        self.state, self.decided_at = state, self.clock()
        return state
