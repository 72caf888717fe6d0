"""Rolling a new model version in by canary share, and the promote-or-roll-back decision.
No Ray here: the router asks `version_for_new_request()` for each new request and tells
`record()` how each one ended.

While the canary runs, `canary_share` of new requests go to the new version (spread evenly,
not at random, so a small window still sees its share). The new version is rolled back as
soon as its error rate over at least `min_requests` passes `max_error_rate` (also before the
window ends: a broken version is taken out at once). Once `window_s` has passed and it served
`min_requests`, its time to first token is compared with the old version's: a canary whose
median TTFT exceeds the old one's by more than `max_ttft_ratio` times (and by more than
`ttft_tolerance_s`, below which differences are noise) is rolled back; otherwise it is
promoted. TTFT is judged only at the window's end, on the whole window's sample: a slow
version still answers, and a few early requests would judge it on noise. After the decision
every new request goes to the winner; the loser's replicas drain (no new admissions).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

STABLE, CANARY = "stable", "canary"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"


@dataclass
class VersionCounts:
    requests: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def median_ttft_s(self) -> float | None:
        return statistics.median(self.ttft_s) if self.ttft_s else None

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.error_rate, 4), "median_ttft_s": self.median_ttft_s}


def ttft_regressed(canary: VersionCounts, stable: VersionCounts, max_ratio: float | None,
                   tolerance_s: float, min_samples: int) -> bool:
    """Whether the canary's median TTFT is worse than the old version's beyond the bounds.
    With too few samples of either version nothing is known, and nothing regressed."""
    if max_ratio is None or min(len(canary.ttft_s), len(stable.ttft_s)) < min_samples:
        return False
    new, old = canary.median_ttft_s, stable.median_ttft_s
    return new > old * max_ratio and new - old > tolerance_s


def versions_key(stable_engine: dict, canary_engine: dict) -> str:
    """Names the pair of versions a rollout judges: a decision holds for that pair only (a
    redeploy with another new version starts a rollout of its own)."""
    pair = json.dumps([stable_engine, canary_engine], sort_keys=True, default=str)
    return hashlib.sha256(pair.encode()).hexdigest()[:16]


class Rollout:
    """The state of one rollout: "canary", then "promoted" or "rolled_back".

    `max_ttft_ratio`: None leaves TTFT out of the decision."""

    def __init__(self, canary_share: float, max_error_rate: float, window_s: float,
                 min_requests: int, max_ttft_ratio: float | None = None,
                 ttft_tolerance_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.canary_share = canary_share
        self.max_error_rate = max_error_rate
        self.window_s = window_s
        self.min_requests = min_requests
        self.max_ttft_ratio = max_ttft_ratio
        self.ttft_tolerance_s = ttft_tolerance_s
        self.clock = clock
        self.state = "canary"
        # Why it was decided: "error_rate", "ttft", "healthy", or "adopted" from a replica.
        self.reason: str | None = None
        self.started_at: float | None = None  # when the canary first took a request
        self.decided_at: float | None = None
        self.counts = {STABLE: VersionCounts(), CANARY: VersionCounts()}
        self._sent = 0
        self._sent_to_canary = 0

    def version_for_new_request(self, canary_ready: bool) -> str:
        """The version a new request goes to. Without a ready canary replica, the stable one."""
        if self.state != "canary":
            return self.winner
        if not canary_ready:
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
        if ttft_s is not None and self.state == "canary":  # kept only while they are judged
            counts.ttft_s.append(ttft_s)
        return self.decide()

    @property
    def winner(self) -> str | None:
        """The version that serves every new request once decided (None while judged)."""
        return {PROMOTED: CANARY, ROLLED_BACK: STABLE}.get(self.state)

    @property
    def loser(self) -> str | None:
        """The version whose replicas drain and go once decided (None while judged)."""
        return {PROMOTED: STABLE, ROLLED_BACK: CANARY}.get(self.state)

    def decide(self) -> str | None:
        """Take the decision if it is due (see the module's docstring); None while undecided."""
        if self.state != "canary" or self.started_at is None:
            return None
        canary = self.counts[CANARY]
        if canary.requests < self.min_requests:
            return None
        if canary.error_rate > self.max_error_rate:
            return self._settle(ROLLED_BACK, "error_rate")
        if self.clock() - self.started_at < self.window_s:
            return None
        if ttft_regressed(canary, self.counts[STABLE], self.max_ttft_ratio,
                          self.ttft_tolerance_s, self.min_requests):
            return self._settle(ROLLED_BACK, "ttft")
        return self._settle(PROMOTED, "healthy")

    def adopt(self, state: str) -> str | None:
        """Take a decision made before (by a router this one replaced, as a replica tells);
        returns it if it is news."""
        if self.state != "canary" or state not in (PROMOTED, ROLLED_BACK):
            return None
        if self.started_at is None:
            self.started_at = self.clock()
        return self._settle(state, "adopted")

    def summary(self) -> dict:
        return {"state": self.state, "reason": self.reason, "canary_share": self.canary_share,
                "max_error_rate": self.max_error_rate, "window_s": self.window_s,
                "max_ttft_ratio": self.max_ttft_ratio,
                "decided_after_s": (None if self.decided_at is None
                                    else round(self.decided_at - self.started_at, 3)),
                **{version: c.summary() for version, c in self.counts.items()}}

    def _settle(self, state: str, reason: str) -> str:
        self.state, self.reason, self.decided_at = state, reason, self.clock()
        return state
