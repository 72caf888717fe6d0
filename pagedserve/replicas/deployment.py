"""The Ray Serve deployment that hosts one engine: one replica of the model.

It streams output deltas to its caller over Serve's handle streaming, tells the router actor
its capacity and the prefix blocks it caches every few tens of milliseconds, and reports ready
only after the weights, the KV cache and one real generation are done.

With tensor parallelism the replica starts ranks 1..N-1 as Ray actors in its placement group
(its engine process is rank 0) and watches them: if one stops, the engine is stopped at once
(in-flight streams end with an EngineDeadError), the router is told to send nothing more, and
the health check fails so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict

import ray
from ray import serve

from pagedserve.autoscale import serve_policy as sp
from pagedserve.config import ClusterConfig
from pagedserve.outputs import RequestOutput
from pagedserve.replicas.engine.startup_phases import PhaseTimer
from pagedserve.replicas.parallel.workers import RankWorkers
from pagedserve.replicas.replica_metrics import ReplicaMetrics
from pagedserve.replicas.startup import report_startup, start_engine
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HASH_REPORT_PERIOD_S = 0.5  # prefix summaries change slowly; capacity is sent more often
HEARTBEAT_S = 1.0
TTFT_WINDOW_S = 10.0  # "recent" TTFT for the autoscaler
DEREGISTER_TIMEOUT_S = 2.0  # a stopping replica's last word to the router
_IMPORTED_AT = time.perf_counter()


class ReplicaDeployment:
    """One engine behind Serve; `generate` yields `RequestOutput` deltas."""

    version = "stable"  # the model version it serves (see `__init__`)

    async def __init__(self, config: dict, router=None, version: str = "stable") -> None:
        """`version`: the model version this replica serves, as the router knows it (a
        rollout runs a "canary" deployment beside the "stable" one)."""
        timer = PhaseTimer()
        timer.add("replica_imports", time.perf_counter() - _IMPORTED_AT)  # at most once per actor
        self.config = ClusterConfig(**config)
        self.version = version
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        # Parked until the router says otherwise, when the deployment keeps parked replicas.
        self.parked = self.config.standby.parked > 0
        self.retired = False  # the router says this version lost a rollout
        self.rollout: dict | None = None  # a rollout's decision, kept for the next router
        self.stopping = False
        self.ranks = None
        if self.config.engine.tensor_parallel_size > 1:
            self.ranks = RankWorkers(self.config, f"pagedserve-{self.replica_id}")
        init_method = self.ranks.init_method if self.ranks is not None else None
        # The engine gets a process of its own: streaming to callers keeps this one's event loop
        # busy, and sharing its GIL slowed the engine's steps tenfold on a GPU.
        try:
            self.engine, self.weights_from = await start_engine(
                self.config, router, timer, init_method, context.app_name,
                [int(g) for g in ray.get_gpu_ids()],
                self.ranks.stopped if self.ranks is not None else None)
        except BaseException:
            if self.ranks is not None:
                self.ranks.kill()
            raise
        self._rank_watch = asyncio.create_task(self._watch_ranks()) if self.ranks else None
        if self.config.warmup:
            with timer.phase("warmup"):
                await self._warm_up()
        if router is not None and self.config.warm_prefixes.top_k > 0:
            with timer.phase("warm_prefixes"):
                self.num_warm_prefixes = await self._warm_prefixes(router)
        self.startup_phases = timer.phases
        report_startup(self.replica_id, timer.phases, self.weights_from)
        self.router = router
        self._router_view = {"queue_len": 0, "oldest_wait_s": 0.0}
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=256)  # (when, seconds)
        self.draining = False
        self._received: list[str] = []
        self._wake = asyncio.Event()
        self._metrics = ReplicaMetrics()
        self._reporter = asyncio.create_task(self._report_loop()) if router is not None else None

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       target_replica: str | None = None) -> AsyncIterator[RequestOutput]:
        """Run one prompt; yield the engine's deltas as they come (without the prompt, which
        the caller sent). `target_replica` is read by the pinned request router."""
        try:
            stream = await self.engine.add_request(prompt, params, request_id)
        finally:  # confirm only once the engine counts it, or the router would see a free slot
            self._received.append(request_id)
            self._wake.set()
        started, first = time.monotonic(), True
        try:
            async for delta in stream:
                if first:
                    first = False
                    self._ttfts.append((time.monotonic(), time.monotonic() - started))
                yield delta
        finally:
            self._wake.set()  # a slot is free: tell the router now, not at the next tick

    async def stats(self) -> dict:
        """Engine counters plus this replica's id and its rank actors' names (tests and
        operators read them)."""
        stats = asdict(await self.engine.stats())
        ranks = self.ranks.names if self.ranks is not None else []
        namespace = self.ranks.namespace if self.ranks is not None else None
        return {"replica_id": self.replica_id, "weights_from": self.weights_from,
                "engine_pid": self.engine.pid, "parked": self.parked,
                "standby_phases": self.engine.standby_phases,
                "num_warm_prefixes": getattr(self, "num_warm_prefixes", 0),
                "startup_phases": self.startup_phases, "rank_workers": ranks,
                "rank_namespace": namespace, **stats}

    def ready(self) -> bool:
        """Answers once this replica is up (the ingress calls it to wake a scaled-to-zero app)."""
        return True

    def check_health(self) -> None:
        self.engine.check_health()
        if self.ranks is not None and (stopped := self.ranks.stopped()) is not None:
            raise RuntimeError(stopped)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Signals for the autoscaling policy (names from `autoscale.serve_policy`)."""
        s = self.engine.stats_nowait()
        recent = time.monotonic() - TTFT_WINDOW_S
        return {
            sp.KV_USAGE: 1.0 - s.num_free_blocks / max(1, s.num_total_blocks),
            sp.NUM_RUNNING: float(s.num_running),
            sp.NUM_WAITING: float(s.num_waiting),
            sp.ROUTER_QUEUE_LEN: float(self._router_view["queue_len"]),
            sp.ROUTER_OLDEST_WAIT_S: float(self._router_view["oldest_wait_s"]),
            sp.RECENT_TTFT_S: max((t for when, t in self._ttfts if when >= recent), default=0.0),
            sp.PARKED: 1.0 if self.parked else 0.0,
            sp.RETIRED: 1.0 if self.retired else 0.0,
        }

    async def drain(self) -> None:
        """Stop taking new requests from the router; running streams go on."""
        self.draining = True
        await self._push_report(include_hashes=False)

    async def __del__(self) -> None:
        """Serve calls this after a failed `__init__` too: release whatever was started."""
        self.draining = self.stopping = True
        if (reporter := getattr(self, "_reporter", None)) is not None:
            reporter.cancel()
            # The router may be gone already (the app is being deleted): a call to a
            # deployment without replicas waits for one, so it is bounded.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.router.deregister.remote(self.replica_id),
                                       DEREGISTER_TIMEOUT_S)
        if (engine := getattr(self, "engine", None)) is not None:
            await engine.shutdown()
        if (ranks := getattr(self, "ranks", None)) is not None:
            ranks.kill()

    async def _watch_ranks(self) -> None:
        """Stop the engine as soon as a rank stops: no half-dead replica keeps taking work."""
        message = await self.ranks.wait_until_one_stops()
        if self.stopping:
            return
        logger.error("%s; stopping this replica's engine", message)
        self.engine.fail(message)
        if getattr(self, "_reporter", None) is not None:  # started: tell the router
            with contextlib.suppress(Exception):  # the health check still fails without it
                await self.drain()

    async def _warm_up(self) -> None:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        async for _ in await self.engine.add_request("Hello", params, "warmup"):
            pass

    async def _warm_prefixes(self, router) -> int:
        """Prefill the cluster's hottest prefixes, so the first requests hit this replica's
        prefix cache as they would an old replica's. Returns how many were prefilled."""
        try:
            prefixes = await router.hot_prefixes.remote()
        except Exception as err:  # noqa: BLE001 (a cold cache is slower, not wrong)
            logger.warning("could not read the hot prefixes from the router: %r", err)
            return 0
        params = SamplingParams(temperature=0, max_tokens=1)

        async def prefill(i: int, tokens: list[int]) -> None:
            async for _ in await self.engine.add_request(tokens, params, f"warm-prefix-{i}"):
                pass

        await asyncio.gather(*(prefill(i, t) for i, t in enumerate(prefixes)))
        return len(prefixes)

    async def _report_loop(self) -> None:
        interval = self.config.router.report_interval_s
        last_key, last_push, last_hashes = None, 0.0, 0.0
        hashes_stale = True  # the cache may have changed since the last summary
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            now = time.monotonic()
            stats = self.engine.stats_nowait()
            self._metrics.record(stats)
            key = (stats.num_running, stats.num_waiting, stats.num_free_blocks, self.draining)
            hashes_stale = hashes_stale or key != last_key
            send_hashes = (hashes_stale and not self.draining  # a stopped engine has none
                           and now - last_hashes >= HASH_REPORT_PERIOD_S)
            quiet = key == last_key and not self._received and not send_hashes
            if quiet and now - last_push < HEARTBEAT_S:
                continue
            try:
                await self._push_report(include_hashes=send_hashes)
            except Exception as err:  # a router restart must not stop this replica
                logger.warning("capacity report to the router failed: %r", err)
                continue
            last_key, last_push = key, now
            if send_hashes:
                last_hashes, hashes_stale = now, False

    async def _push_report(self, include_hashes: bool) -> None:
        """Send the router this replica's capacity and the requests it received since the last
        report.

        The counters and the received ids are read together, with no await between: the
        router stops reserving a slot for each received id, so a count taken before a request
        arrived, sent with its id, would show a free slot that is not there. Ids whose report
        failed are sent with the next one.
        """
        hashes = None
        if include_hashes:
            limit = self.config.router.max_hashes_per_report
            hashes = list(await self.engine.cached_block_hashes())[:limit]
        stats = self.engine.stats_nowait()
        received, self._received = self._received, []
        engine_config = self.config.engine
        report = {
            "replica_id": self.replica_id,
            "max_num_seqs": engine_config.max_num_seqs,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "num_free_blocks": stats.num_free_blocks,
            "num_total_blocks": stats.num_total_blocks,
            "block_size": engine_config.block_size,
            "received_ids": received,
            "block_hashes": hashes,
            "draining": self.draining,
            "version": self.version,
            "rollout": self.rollout,
            "num_prefix_queried_tokens": stats.num_prefix_queried_tokens,
            "num_prefix_hit_tokens": stats.num_prefix_hit_tokens,
        }
        try:
            view = await self.router.report.remote(report)
        except BaseException:
            self._received = received + self._received
            raise
        if isinstance(view, dict):  # the router's queue, relayed to the autoscaler
            self._router_view = view
            self.parked = bool(view.get("parked", False))
            self.retired = bool(view.get("retired", False))
            self.rollout = view.get("rollout") or self.rollout  # a decision is for good
