"""The router actor: the cluster's one admission queue (a single-replica Serve deployment).

Ingress replicas call `admit`, which returns the id of the replica that must run the request
once one has room; replicas call `report` with their capacity. Tokens never pass through here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields

from ray.serve.metrics import Gauge

from pagedserve.cluster.admission import (
    AdmissionQueue,
    AdmissionRequest,
    QueueFullError,
    ReplicaReport,
)
from pagedserve.config import RouterConfig

logger = logging.getLogger(__name__)

EXPIRY_PERIOD_S = 1.0
_REPORT_FIELDS = {f.name for f in fields(ReplicaReport)}


class RouterDeployment:
    """Late-bound admission across replicas, with prefix affinity and bounded imbalance."""

    def __init__(self, config: dict | None = None) -> None:
        self.config = RouterConfig(**(config or {}))
        self.queue = AdmissionQueue(self.config)
        self._futures: dict[str, asyncio.Future] = {}
        self._queue_len = Gauge("pagedserve_router_queue_len",
                                description="requests waiting in the router for a replica")
        self._replicas = Gauge("pagedserve_router_replicas",
                               description="replicas reporting capacity to the router")
        self._expiry: asyncio.Task | None = None

    async def admit(self, request: dict) -> str:
        """Wait until a replica has room for `request`; return that replica's id.

        Raises QueueFullError when the queue is full. Cancelling the call (the client left)
        removes the request from the queue.
        """
        self._ensure_expiry()
        admission = AdmissionRequest(**{**request, "exclude": frozenset(request.get("exclude", ()))})
        future = asyncio.get_running_loop().create_future()
        self.queue.enqueue(admission)  # QueueFullError goes back to the ingress
        self._futures[admission.request_id] = future
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self.queue.cancel(admission.request_id)
            if future.done() and not future.cancelled():
                self.queue.release(future.result(), admission.request_id)
            raise
        finally:
            self._futures.pop(admission.request_id, None)

    def report(self, report: dict) -> None:
        """A replica's capacity report; it also frees room for whoever waits."""
        self.queue.report(ReplicaReport(**{k: v for k, v in report.items() if k in _REPORT_FIELDS}))
        self._dispatch()

    def release(self, replica_id: str, request_id: str) -> None:
        """An admitted request never reached its replica (its client left first)."""
        self.queue.release(replica_id, request_id)
        self._dispatch()

    def deregister(self, replica_id: str) -> None:
        """A replica is shutting down: forget it (its running streams finish on their own)."""
        self.queue.remove_replica(replica_id)

    def replica_failed(self, replica_id: str) -> None:
        """A caller saw this replica fail: stop admitting to it until it reports again."""
        logger.warning("replica %s failed; no more admissions to it", replica_id)
        self.queue.remove_replica(replica_id)

    def stats(self) -> dict:
        return {
            "queue_len": len(self.queue),
            "oldest_wait_s": self.queue.oldest_wait_s(),
            "replicas": {
                rid: {"load": s.load, "num_admitted": s.num_admitted,
                      "num_free_blocks": s.report.num_free_blocks,
                      "num_running": s.report.num_running, "num_waiting": s.report.num_waiting,
                      "draining": s.report.draining}
                for rid, s in self.queue.replicas.items()
            },
        }

    def num_ready_replicas(self) -> int:
        return sum(1 for s in self.queue.replicas.values() if not s.report.draining)

    def _dispatch(self) -> None:
        for request_id, replica_id in self.queue.assign():
            future = self._futures.get(request_id)
            if future is not None and not future.done():
                future.set_result(replica_id)
            else:
                self.queue.release(replica_id, request_id)
        self._queue_len.set(len(self.queue))
        self._replicas.set(len(self.queue.replicas))

    def _ensure_expiry(self) -> None:
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_PERIOD_S)
            self._dispatch()  # assign() drops silent replicas and unconfirmed reservations


__all__ = ["QueueFullError", "RouterDeployment"]
