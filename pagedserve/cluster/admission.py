"""The router's admission logic: a global queue and the choice of replica. No Ray here.

A request waits in this queue, not in a busy replica, until some replica reports room for it
(a batch slot, few enough unstarted requests, and free KV blocks for its prompt). Among the
replicas with room it prefers the one that already holds the longest prefix of the prompt's
chained block hashes, unless that replica's load exceeds the least loaded one's by more than
`imbalance_bound`. Within a priority, requests leave strictly in arrival order.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pagedserve.cluster.parking import Parking
from pagedserve.config import RouterConfig


class QueueFullError(Exception):
    """The admission queue holds `max_queue_len` requests already."""


class PromptTooLargeError(ValueError):
    """No replica's whole KV cache can hold the prompt, so no replica will ever have room."""


@dataclass
class ReplicaReport:
    """What a replica tells the router about its capacity, sent every few tens of milliseconds."""

    replica_id: str
    max_num_seqs: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    received_ids: list[str] = field(default_factory=list)  # admitted requests it now holds
    block_hashes: list[int] | None = None  # prefix blocks it caches; None: unchanged
    draining: bool = False
    version: str = "stable"  # the model version it serves (a rollout runs two)
    # Its engine's running totals of prompt tokens looked up in, and found in, its prefix
    # cache (shown in the router's stats, for benchmarks that compare routing policies).
    num_prefix_queried_tokens: int = 0
    num_prefix_hit_tokens: int = 0


@dataclass
class AdmissionRequest:
    """What the router needs to know of a request to place it."""

    request_id: str
    num_prompt_tokens: int
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full prompt blocks
    priority: int = 0  # lower is admitted first, as in vLLM
    exclude: frozenset[str] = frozenset()  # replicas that already failed this request
    version: str | None = None  # only replicas of this model version (None: any)


@dataclass
class _Reservation:
    blocks: int
    hashes: list[int]
    since: float


class ReplicaState:
    """The router's view of one replica: its last report plus what was admitted since."""

    def __init__(self, report: ReplicaReport, now: float) -> None:
        self.report = report
        self.hashes: set[int] = set(report.block_hashes or ())
        self.reserved: dict[str, _Reservation] = {}
        self.last_seen = now
        self.num_admitted = 0

    @property
    def load(self) -> int:
        r = self.report
        return r.num_running + r.num_waiting + len(self.reserved)

    def update(self, report: ReplicaReport, now: float) -> None:
        for request_id in report.received_ids:
            self.reserved.pop(request_id, None)
        if report.block_hashes is not None:
            self.hashes = set(report.block_hashes)
        self.report, self.last_seen = report, now

    def has_room(self, blocks_needed: int, max_waiting: int) -> bool:
        r = self.report
        if r.draining or self.load >= r.max_num_seqs:
            return False
        if r.num_waiting > max_waiting:  # its engine already has a backlog: let it drain first
            return False
        reserved_blocks = sum(res.blocks for res in self.reserved.values())
        return r.num_free_blocks - reserved_blocks >= blocks_needed

    def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """How many leading blocks of a prompt this replica holds or is about to hold."""
        pending = {h for res in self.reserved.values() for h in res.hashes}
        count = 0
        for h in block_hashes:
            if h not in self.hashes and h not in pending:
                break
            count += 1
        return count


class AdmissionQueue:
    """Global FIFO-within-priority queue of requests waiting for a replica with room."""

    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic,
                 parking: Parking | None = None) -> None:
        self.config = config
        self.clock = clock
        self.parking = parking if parking is not None else Parking(0, 0, 0.0, clock)
        self.replicas: dict[str, ReplicaState] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._waiting: dict[str, tuple[AdmissionRequest, float]] = {}
        self._order = itertools.count()
        self._rejected: list[tuple[str, PromptTooLargeError]] = []
        self.retired: set[str] = set()  # replicas being stopped: their reports are ignored

    def __len__(self) -> int:
        return len(self._waiting)

    def report(self, report: ReplicaReport) -> None:
        if report.replica_id in self.retired:
            return  # a stopping replica keeps reporting until its streams end
        now = self.clock()
        state = self.replicas.get(report.replica_id)
        if state is None:
            serving = (rid for rid in self.replicas if not self.parking.is_parked(rid))
            self.parking.place_new(report.replica_id, serving)
            self.replicas[report.replica_id] = ReplicaState(report, now)
        else:
            state.update(report, now)

    def remove_replica(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)
        self.parking.forget(replica_id)

    def rebalance_parking(self) -> None:
        """Park or un-park replicas so the serving count meets `parking.serving_target`."""
        self.parking.rebalance({rid: s.load for rid, s in self.replicas.items()})

    def set_retired(self, replica_ids: set[str]) -> None:
        """Admit nothing more to replicas being stopped, even if they report again.

        Called with the whole current set, so ids of replicas that are gone do not pile up.
        """
        self.retired = set(replica_ids)
        for replica_id in self.retired:
            self.remove_replica(replica_id)

    def release(self, replica_id: str, request_id: str) -> None:
        """Give back a reservation whose request never reached its replica."""
        state = self.replicas.get(replica_id)
        if state is not None:
            state.reserved.pop(request_id, None)

    def enqueue(self, request: AdmissionRequest) -> None:
        if request.request_id in self._waiting:
            raise ValueError(f"request {request.request_id!r} is already queued")
        if len(self._waiting) >= self.config.max_queue_len:
            raise QueueFullError(f"{len(self._waiting)} requests are queued already")
        self._waiting[request.request_id] = (request, self.clock())
        heapq.heappush(self._heap, (request.priority, next(self._order), request.request_id))

    def retarget(self, from_version: str, to_version: str) -> None:
        """Queued requests for replicas of `from_version` wait for `to_version`'s instead."""
        for request_id, (request, since) in self._waiting.items():
            if request.version == from_version:
                self._waiting[request_id] = (replace(request, version=to_version), since)

    def cancel(self, request_id: str) -> None:
        """Forget a queued request (its client went away); the heap entry is skipped later."""
        self._waiting.pop(request_id, None)

    def oldest_wait_s(self) -> float:
        now = self.clock()
        return max((now - since for _, since in self._waiting.values()), default=0.0)

    def assign(self) -> list[tuple[str, str]]:
        """Place queued requests in order while the head fits somewhere: `(request, replica)`."""
        self._expire()
        placed = []
        while self._heap:
            _, _, request_id = self._heap[0]
            entry = self._waiting.get(request_id)
            if entry is None:  # cancelled
                heapq.heappop(self._heap)
                continue
            replica_id = self.choose(entry[0])
            if replica_id is None and self._unpark_for(entry[0]):
                replica_id = self.choose(entry[0])
            if replica_id is None:
                error = self._never_fits(entry[0])
                if error is None:
                    break  # strict order: nobody overtakes the head of the queue
                self._rejected.append((request_id, error))  # else it blocks everyone behind
            else:
                self._reserve(self.replicas[replica_id], entry[0])
                placed.append((request_id, replica_id))
            heapq.heappop(self._heap)
            del self._waiting[request_id]
        return placed

    def take_rejected(self) -> list[tuple[str, PromptTooLargeError]]:
        """Requests `assign` dropped because no replica could ever hold them, with the reason."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def choose(self, request: AdmissionRequest) -> str | None:
        """The replica for `request` now, or None if no replica has room."""
        blocks = self._blocks_needed(request)
        max_waiting = self.config.max_waiting_per_replica
        candidates = [
            (rid, s) for rid, s in self.replicas.items()
            if rid not in request.exclude and not self.parking.is_parked(rid)
            and _serves(s, request) and s.has_room(blocks, max_waiting)
        ]
        if not candidates:
            return None
        least = min(candidates, key=lambda c: (c[1].load, -c[1].report.num_free_blocks))
        if request.block_hashes:
            scored = [(s.cached_prefix_blocks(request.block_hashes), rid, s) for rid, s in candidates]
            matched, best, state = max(scored, key=lambda c: (c[0], -c[2].load))
            if matched and state.load <= least[1].load + self.config.imbalance_bound:
                return best
        return least[0]

    def _unpark_for(self, request: AdmissionRequest) -> bool:
        """Un-park the parked replica with the most free blocks that has room for `request`."""
        blocks = self._blocks_needed(request)
        room = [(s.report.num_free_blocks, rid) for rid, s in self.replicas.items()
                if self.parking.is_parked(rid) and rid not in request.exclude
                and s.has_room(blocks, self.config.max_waiting_per_replica)]
        if not room:
            return False
        self.parking.unpark(max(room)[1])
        return True

    def _never_fits(self, request: AdmissionRequest) -> PromptTooLargeError | None:
        """Why `request` can never be placed, if even an idle replica's KV cache is too small.

        Replicas of a deployment share one configuration, so those reporting stand for any
        that start later; with none reporting yet, nothing is known and the request waits.
        """
        states = [s for rid, s in self.replicas.items()
                  if rid not in request.exclude and _serves(s, request)]
        blocks = self._blocks_needed(request)
        capacity = max((s.report.num_total_blocks for s in states), default=None)
        if capacity is None or blocks <= capacity:
            return None
        block_size = max(s.report.block_size for s in states)
        return PromptTooLargeError(
            f"the prompt has {request.num_prompt_tokens} tokens; with one generated token it "
            f"needs {blocks} KV-cache blocks, but a replica holds at most {capacity} "
            f"({capacity * block_size} tokens)")

    def _blocks_needed(self, request: AdmissionRequest) -> int:
        block_size = max((s.report.block_size for s in self.replicas.values()), default=16)
        return math.ceil((request.num_prompt_tokens + 1) / block_size)

    def _reserve(self, state: ReplicaState, request: AdmissionRequest) -> None:
        state.reserved[request.request_id] = _Reservation(
            self._blocks_needed(request), request.block_hashes, self.clock())
        state.num_admitted += 1

    def _expire(self) -> None:
        """Drop silent replicas, and reservations a replica never confirmed (client left)."""
        now = self.clock()
        stale = [rid for rid, s in self.replicas.items()
                 if now - s.last_seen > self.config.stale_after_s]
        for rid in stale:
            self.remove_replica(rid)
        for state in self.replicas.values():
            old = [rid for rid, res in state.reserved.items()
                   if now - res.since > self.config.stale_after_s]
            for rid in old:
                del state.reserved[rid]


def _serves(state: ReplicaState, request: AdmissionRequest) -> bool:
    return request.version is None or state.report.version == request.version
