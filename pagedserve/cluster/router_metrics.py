"""The router's metrics: queue, admissions per replica, queue time, and replicas by state.

A replica is `serving` while it reports and the router may admit to it, `parked` while the router
keeps it warm but admits nothing, `draining` while it finishes its streams before it stops (it
said so, or Serve is stopping it), and `starting` while Serve runs it but it has not reported
yet (its engine is still loading). `starting` is known only where the router watches the
deployment's membership (autoscaled deployments).
"""

from __future__ import annotations

from collections.abc import Iterable

from pagedserve.metric_list import serve_metrics_for

REPLICA_STATES = ("serving", "starting", "draining", "parked")
SERVE_STOPPING = "STOPPING"


def count_by_state(reporting: dict[str, bool], parked: Iterable[str],
                   serve_states: dict[str, str] | None) -> dict[str, int]:
    """Replicas per state. `reporting`: the replicas the router hears from, each with its
    draining flag. `serve_states`: the Serve controller's state per replica, when watched."""
    parked = set(parked) & reporting.keys()
    counts = dict.fromkeys(REPLICA_STATES, 0)
    stopping = {rid for rid, s in (serve_states or {}).items() if s == SERVE_STOPPING}
    for rid, draining in reporting.items():
        if draining or rid in stopping:
            counts["draining"] += 1
        elif rid in parked:
            counts["parked"] += 1
        else:
            counts["serving"] += 1
    for rid, state in (serve_states or {}).items():
        if rid not in reporting:
            counts["draining" if state == SERVE_STOPPING else "starting"] += 1
    return counts


class RouterMetrics:
    """Records the router's metrics, all registered from the metric list."""

    def __init__(self) -> None:
        self._metrics = serve_metrics_for("router")
        self.serve_states: dict[str, str] | None = None  # set by the membership watch
        self.by_state = dict.fromkeys(REPLICA_STATES, 0)

    def admitted(self, replica_id: str, waited_s: float) -> None:
        self._metrics["admissions"].inc(tags={"replica_id": replica_id})
        self._metrics["queue_s"].observe(waited_s)

    def update(self, queue_len: int, oldest_wait_s: float, reporting: dict[str, bool],
               parked: Iterable[str]) -> None:
        self._metrics["router_queue_len"].set(queue_len)
        self._metrics["router_oldest_wait_s"].set(oldest_wait_s)
        self.by_state = count_by_state(reporting, parked, self.serve_states)
        for state, count in self.by_state.items():
            self._metrics["replicas"].set(count, tags={"state": state})
