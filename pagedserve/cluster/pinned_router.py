"""Serve request router that sends a call to the replica the router actor chose for it.

Serve runs one request router in every caller (here, in each ingress replica); the global
decision is the router actor's, passed along as the call's `target_replica` keyword. If that
replica is not (or no longer) among Serve's live replicas, the call waits briefly for Serve's
view to catch up, then goes to any live replica rather than hang: a request that had not
started is thereby re-routed.
"""

from __future__ import annotations

import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

TARGET_KWARG = "target_replica"
TARGET_GRACE_S = 5.0


class PinnedRequestRouter(RequestRouter):
    """Route each call to the replica named by its `target_replica` keyword argument."""

    def initialize_state(self, **kwargs) -> None:
        self._first_seen: dict[str, float] = {}
        self._grace_s = float(kwargs.get("target_grace_s", TARGET_GRACE_S))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(TARGET_KWARG) if pending_request else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # else an empty tier spins
        if target is None:
            return [candidate_replicas]
        for replica in candidate_replicas:
            if replica.replica_id.unique_id == target:
                self._first_seen.pop(target, None)
                return [[replica]]
        key = pending_request.metadata.internal_request_id
        first = self._first_seen.setdefault(key, time.monotonic())
        if time.monotonic() - first < self._grace_s:
            return []
        self._first_seen.pop(key, None)
        return [candidate_replicas]
