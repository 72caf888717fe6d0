"""Metrics of the gateway: response cache hits, misses, errors and bytes; auth rejections.

Declared in `pagedserve.metric_list` and registered twice, as `cluster/metrics.py` does: through
`ray.serve.metrics` (Ray dashboard and Ray's Prometheus export) and in the ingress's own
registry (its `/metrics` route).
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import CollectorRegistry

from pagedserve.cluster.metrics import prometheus_mirror
from pagedserve.metric_list import API_KEYS, METRICS, RESPONSE_CACHE, serve_metric

GATEWAY_METRICS = [m for m in METRICS if m.needs in (RESPONSE_CACHE, API_KEYS)]
# Ray's export drops a gauge series a process stops setting (after about two export intervals),
# and the cache's size changes only on a store: the last sizes are set again this often.
GAUGE_REFRESH_S = 1.0


class GatewayMetrics:
    """One call per event; each updates both exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._prom = {m.name: prometheus_mirror(m, registry) for m in GATEWAY_METRICS}
        self._serve = {m.name: serve_metric(m.name) for m in GATEWAY_METRICS}
        self._bytes: dict[str, int] = {}  # level -> the last size, set again every second
        self._refresher: threading.Thread | None = None

    def cache_hit(self, level: str) -> None:
        self._inc("pagedserve_response_cache_hits", level=level)

    def cache_miss(self) -> None:
        self._inc("pagedserve_response_cache_misses")

    def cache_error(self, level: str) -> None:
        self._inc("pagedserve_response_cache_errors", level=level)

    def cache_bytes(self, level: str, nbytes: int) -> None:
        name = "pagedserve_response_cache_bytes"
        self._prom[name].labels(level=level).set(nbytes)
        self._serve[name].set(nbytes, tags={"level": level})
        self._bytes[level] = nbytes
        if self._refresher is None:
            self._refresher = threading.Thread(target=_refresh_gauges, args=(weakref.ref(self),),
                                               name="gateway-gauges", daemon=True)
            self._refresher.start()

    def refresh_gauges(self) -> None:
        for level, nbytes in list(self._bytes.items()):
            self._serve["pagedserve_response_cache_bytes"].set(nbytes, tags={"level": level})

    def auth_rejection(self, key_name: str, code: int) -> None:
        self._inc("pagedserve_auth_rejections", key_name=key_name, code=str(code))

    def _inc(self, name: str, **tags: str) -> None:
        prom = self._prom[name]
        (prom.labels(**tags) if tags else prom).inc()
        self._serve[name].inc(tags=tags or None)


def _refresh_gauges(metrics: weakref.ref) -> None:
    """Set the gateway's gauges again every GAUGE_REFRESH_S while its metrics object lives."""
    stop = threading.Event()
    while not stop.wait(GAUGE_REFRESH_S):
        alive = metrics()
        if alive is None:
            return
        alive.refresh_gauges()
        del alive
