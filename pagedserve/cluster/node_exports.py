"""The `ray_pagedserve_*` families of every alive node's Ray metrics export, for `/metrics`.

Each Ray node's metrics agent exports the metrics of the processes on that node (replicas,
router, autoscaler, ingress). The ingress fetches them all concurrently with a short timeout
and keeps the result for `ttl_s`, so a scrape costs at most one round of fetches per second.
A node that does not answer is skipped (logged once, counted in `skipped`), never an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import ray
from prometheus_client.metrics_core import Metric

from pagedserve.cluster.metrics_merge import parse_export

logger = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 2.0
CACHE_TTL_S = 1.0


def export_urls(nodes: list[dict]) -> list[str]:
    """The metrics-export URL of each alive node, each address once."""
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in nodes if n.get("Alive") and n.get("MetricsExportPort")]
    return list(dict.fromkeys(urls))


class NodeExports:
    """Fetches and caches the pagedserve families of every node's export."""

    def __init__(self, nodes: Callable[[], list[dict]] = ray.nodes,
                 timeout_s: float = FETCH_TIMEOUT_S, ttl_s: float = CACHE_TTL_S,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._nodes, self._timeout_s, self._ttl_s = nodes, timeout_s, ttl_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None  # made on the serving event loop
        self._lock = asyncio.Lock()
        self._families: list[Metric] = []
        self._fetched_at = -float("inf")
        self.failing: set[str] = set()  # exports that did not answer the last round
        self.skipped = 0  # fetches skipped since the start

    async def families(self) -> list[Metric]:
        """The families of the last round, fetching a new one when it is older than ttl_s."""
        async with self._lock:
            if time.monotonic() - self._fetched_at >= self._ttl_s:
                self._families = await self._fetch_all()
                self._fetched_at = time.monotonic()
            return self._families

    async def _fetch_all(self) -> list[Metric]:
        try:
            urls = export_urls(await asyncio.to_thread(self._nodes))
        except Exception as err:  # the GCS is away: serve the ingress's own metrics only
            logger.warning("cannot list the cluster's nodes for /metrics: %r", err)
            return []
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport)
        rounds = await asyncio.gather(*(self._fetch(url) for url in urls))
        return [family for families in rounds for family in families]

    async def _fetch(self, url: str) -> list[Metric]:
        try:
            response = await self._client.get(url)
            response.raise_for_status()
            families = parse_export(response.text)
        except Exception as err:  # down, slow, or not Prometheus text: skip this node
            self.skipped += 1
            if url not in self.failing:
                logger.warning("skipping the metrics export %s in /metrics: %r", url, err)
            self.failing.add(url)
            return []
        if url in self.failing:
            logger.info("the metrics export %s answers again", url)
            self.failing.discard(url)
        return families
