"""The router actor: the cluster's one admission queue (a single-replica Serve deployment).

Ingress replicas call `admit`, which returns the id of the replica that must run the request
once one has room; replicas call `report` with their capacity. Tokens never pass through here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import fields

import ray
from ray import serve

from pagedserve.cluster.admission import (
    AdmissionQueue,
    AdmissionRequest,
    PromptTooLargeError,
    QueueFullError,
    ReplicaReport,
)
from pagedserve.cluster.hot_prefixes import HotPrefixes
from pagedserve.cluster.membership import STOPPING_STATES, watch_membership
from pagedserve.cluster.parking import Parking
from pagedserve.cluster.rollout import STABLE
from pagedserve.cluster.rollout_watch import RolloutWatch
from pagedserve.cluster.router_calls import ROUTER_REPLACED
from pagedserve.cluster.router_metrics import RouterMetrics
from pagedserve.config import RouterConfig, WarmPrefixConfig
from pagedserve.replicas.node.services import NodeServices

logger = logging.getLogger(__name__)
serve_logger = logging.getLogger("ray.serve")  # INFO lines that reach the replica's log file

EXPIRY_PERIOD_S = 1.0
_REPORT_FIELDS = {f.name for f in fields(ReplicaReport)}


class RouterDeployment:
    """Late-bound admission across replicas, with prefix affinity and bounded imbalance."""

    def __init__(self, config: dict | None = None, replica_deployment: str | None = None,
                 membership_poll_s: float = 0.5, node_services: dict | None = None,
                 parking: dict | None = None, warm_prefixes: dict | None = None,
                 rollout: dict | None = None, canary_deployment: str | None = None) -> None:
        """`replica_deployment` (and a rollout's `canary_deployment`): watch that deployment's
        replicas and drain the ones Serve stops. The router also watches its own replica: one
        that Serve stops hands its queued requests back (`ROUTER_REPLACED`).
        `node_services`: `NodeServices` arguments (weight store, standby pool): this node's
        start now, before any scale-up. `parking`: `Parking` arguments (parked replicas).
        `warm_prefixes`: a `WarmPrefixConfig` dict (hot prefixes new replicas prefill).
        `rollout`: `Rollout` arguments: a new model version takes a canary share (see
        `admit_versioned`)."""
        self.config = RouterConfig(**(config or {}))
        self.parking = Parking(clock=time.monotonic, **(parking or {"parked": 0,
                                                                   "serving_target": 0,
                                                                   "hold_s": 0.0}))
        self.queue = AdmissionQueue(self.config, parking=self.parking)
        warm = WarmPrefixConfig(**(warm_prefixes or {}))
        self.hot = HotPrefixes(warm.half_life_s, warm.max_tokens, time.monotonic)
        self.warm_top_k = warm.top_k
        self._futures: dict[str, asyncio.Future] = {}
        self._expiry: asyncio.Task | None = None
        self._metrics = RouterMetrics()
        # Drain the replicas Serve stops (watched from the first report on, since a sync
        # constructor may not run on the actor's event loop).
        self._watched = replica_deployment
        self._canary_watched = canary_deployment
        self._membership_poll_s = membership_poll_s
        self._watchers: list[asyncio.Task] = []
        self._stopping_canaries: set[str] = set()
        self._stopping = False  # Serve is replacing this router
        self.rollout = RolloutWatch(rollout) if rollout is not None else None
        self._services = None
        if node_services is not None:
            self._services = NodeServices(serve.get_replica_context().app_name, **node_services)
            self._services.ensure(ray.get_runtime_context().get_node_id())

    async def admit(self, request: dict) -> str:
        """Wait until a replica has room for `request`; return that replica's id, or
        `ROUTER_REPLACED` when Serve is replacing this router (submit it to the next one).

        Raises QueueFullError when the queue is full, PromptTooLargeError when no replica could
        ever hold the prompt. Cancelling the call (the client left) removes the request from
        the queue.
        """
        answer = await self.admit_versioned(request)
        return answer if answer == ROUTER_REPLACED else answer[0]

    async def admit_versioned(self, request: dict) -> tuple[str, str | None] | str:
        """`admit`, and the model version of the chosen replica: with a rollout running, the
        rollout picks the version of each new request (None without one). A request still
        queued when the rollout decides goes to the winner."""
        if self.rollout is None:
            replica_id = await self._admit(request)
            return replica_id if replica_id == ROUTER_REPLACED else (replica_id, None)
        version = self.rollout.version_for_new_request(self.queue.replicas.values())
        replica_id = await self._admit({**request, "version": version})
        if replica_id == ROUTER_REPLACED:
            return replica_id
        state = self.queue.replicas.get(replica_id)
        return replica_id, state.report.version if state is not None else version

    def record_outcome(self, version: str, ok: bool, ttft_s: float | None = None) -> None:
        """How a request sent to `version` ended (the ingress tells): judges the rollout.
        Once decided, requests queued for the loser wait for the winner's replicas instead:
        the loser's are about to stop."""
        if self.rollout is not None and self.rollout.record(version, ok, ttft_s) is not None:
            self._on_decision()

    def _on_decision(self) -> None:
        self.queue.retarget(self.rollout.loser, self.rollout.winner)
        self._dispatch()

    async def _admit(self, request: dict) -> str:
        if self._stopping:
            return ROUTER_REPLACED
        self._ensure_expiry()
        prefix_tokens = request.pop("prefix_tokens", None)
        if prefix_tokens:
            self.hot.record(request.get("block_hashes") or [], prefix_tokens, self._block_size())
        admission = AdmissionRequest(**{**request, "exclude": frozenset(request.get("exclude", ()))})
        future = asyncio.get_running_loop().create_future()
        self.queue.enqueue(admission)  # QueueFullError goes back to the ingress
        self._futures[admission.request_id] = future
        self._dispatch()
        started = time.monotonic()
        try:
            replica_id = await future
            if replica_id != ROUTER_REPLACED:
                self._metrics.admitted(replica_id, time.monotonic() - started)
            return replica_id
        except asyncio.CancelledError:
            self.queue.cancel(admission.request_id)
            if future.done() and not future.cancelled():
                self.queue.release(future.result(), admission.request_id)
            raise
        finally:
            self._futures.pop(admission.request_id, None)

    async def report(self, report: dict) -> dict:
        """A replica's capacity report; it also frees room for whoever waits.

        Returns the queue's depth and oldest wait, which replicas relay to the autoscaler,
        whether the replica is parked, and in a rollout its decision and whether the replica's
        version lost (its autoscaling policy then scales its deployment to 0). Replicas keep
        the decision and send it with their reports (`rollout`), so a router that replaced
        this one adopts it instead of judging the rollout again.
        """
        self._ensure_watcher()
        if self.rollout is not None and self.rollout.adopt(report.get("rollout")) is not None:
            self._on_decision()
        self.queue.report(ReplicaReport(**{k: v for k, v in report.items() if k in _REPORT_FIELDS}))
        self._dispatch()
        view = {"queue_len": len(self.queue), "oldest_wait_s": self.queue.oldest_wait_s(),
                "parked": self.parking.is_parked(report["replica_id"])}
        if self.rollout is not None:
            view["rollout"] = self.rollout.decided
            view["retired"] = self.rollout.lost(report.get("version", STABLE))
        return view

    def hot_prefixes(self) -> list[list[int]]:
        """Token ids of the cluster's hottest prompt prefixes, for a new replica to prefill."""
        return self.hot.top(self.warm_top_k)

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

    def ensure_node_services(self, node_id: str) -> bool:
        """Start `node_id`'s weight store and standby pool if it has none (a replica on a new
        node asks; the router owns them so they live as long as the application)."""
        if self._services is None:
            return False
        self._services.ensure(node_id)
        return True

    def forget_node_service(self, node_id: str, kind: str) -> None:
        """A replica found a service of this node dead: the next replica gets a new one."""
        if self._services is not None:
            logger.warning("%s on node %s is gone; a new one will be made", kind, node_id)
            self._services.forget(node_id, kind)

    def stats(self) -> dict:
        return {
            "queue_len": len(self.queue),
            "oldest_wait_s": self.queue.oldest_wait_s(),
            "replicas": {
                rid: {"load": s.load, "num_admitted": s.num_admitted,
                      "num_free_blocks": s.report.num_free_blocks,
                      "num_running": s.report.num_running, "num_waiting": s.report.num_waiting,
                      "kv_usage": 1.0 - s.report.num_free_blocks / max(1, s.report.num_total_blocks),
                      "draining": s.report.draining, "parked": self.parking.is_parked(rid),
                      "version": s.report.version,
                      "prefix_queried_tokens": s.report.num_prefix_queried_tokens,
                      "prefix_hit_tokens": s.report.num_prefix_hit_tokens}
                for rid, s in self.queue.replicas.items()
            },
            "replicas_by_state": self._metrics.by_state,
            "num_unparked": self.parking.num_unparked,
            "num_hot_prefixes": len(self.hot),
            "rollout": self.rollout.summary() if self.rollout is not None else None,
        }

    def num_ready_replicas(self) -> int:
        return sum(1 for s in self.queue.replicas.values() if not s.report.draining)

    def _on_replica_states(self, states: dict[str, str], target: int) -> None:
        self._retire(_stopping(states) | self._stopping_canaries)
        self._metrics.serve_states = states
        self.parking.set_deployment_target(target)
        self.queue.rebalance_parking()
        self._dispatch()

    def _on_canary_states(self, states: dict[str, str], target: int) -> None:
        self._stopping_canaries = _stopping(states)

    def _retire(self, stopping: set[str]) -> None:
        for rid in stopping - self.queue.retired:
            serve_logger.info("replica %s is stopping: draining it (no new admissions)", rid)
        self.queue.set_retired(stopping)

    def _on_router_states(self, states: dict[str, str], target: int) -> None:
        """Serve is replacing this router: hand every queued request back, to be submitted
        to the successor (which the replicas now report to), and take no new ones."""
        me = serve.get_replica_context().replica_id.unique_id
        if self._stopping or me not in _stopping(states):
            return
        self._stopping = True
        serve_logger.info("this router is being replaced: %d queued requests go to the next",
                          len(self._futures))
        for request_id, future in self._futures.items():
            self.queue.cancel(request_id)
            if not future.done():
                future.set_result(ROUTER_REPLACED)

    def _block_size(self) -> int:
        return max((s.report.block_size for s in self.queue.replicas.values()), default=16)

    def _dispatch(self) -> None:
        for request_id, replica_id in self.queue.assign():
            future = self._futures.get(request_id)
            if future is not None and not future.done():
                future.set_result(replica_id)
            else:
                self.queue.release(replica_id, request_id)
        self._fail_rejected()
        self._metrics.update(len(self.queue), self.queue.oldest_wait_s(),
                             {rid: s.report.draining or rid in self.queue.retired
                              for rid, s in self.queue.replicas.items()}, self.parking.parked)

    def _fail_rejected(self) -> None:
        """End the admissions of requests that no replica could ever hold, with the reason."""
        for request_id, error in self.queue.take_rejected():
            future = self._futures.get(request_id)
            if future is not None and not future.done():
                future.set_exception(error)

    def _ensure_watcher(self) -> None:
        if self._watched is None or (self._watchers and not any(t.done() for t in self._watchers)):
            return
        for task in self._watchers:
            task.cancel()
        context = serve.get_replica_context()
        watched = {self._watched: self._on_replica_states,
                   context.deployment: self._on_router_states}
        if self._canary_watched is not None:
            watched[self._canary_watched] = self._on_canary_states
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(watch_membership(
            context.app_name, name, self._membership_poll_s, on_states))
            for name, on_states in watched.items()]

    def _ensure_expiry(self) -> None:
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_PERIOD_S)
            self.queue.rebalance_parking()
            self._dispatch()  # assign() drops silent replicas and unconfirmed reservations


def _stopping(states: dict[str, str]) -> set[str]:
    return {rid for rid, state in states.items() if state in STOPPING_STATES}


__all__ = ["PromptTooLargeError", "QueueFullError", "RouterDeployment"]
