"""Metrics of the gateway: response cache hits, misses, errors and bytes; auth rejections.

Declared in `pagedserve.metric_list` and registered twice, as `cluster/metrics.py` does: through
`ray.serve.metrics` (Ray dashboard and Ray's Prometheus export) and in the ingress's own
registry (its `/metrics` route).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pagedserve.cluster.metrics import prometheus_mirror
from pagedserve.metric_list import API_KEYS, METRICS, RESPONSE_CACHE, serve_metric

GATEWAY_METRICS = [m for m in METRICS if m.needs in (RESPONSE_CACHE, API_KEYS)]


class GatewayMetrics:
    """One call per event; each updates both exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._prom = {m.name: prometheus_mirror(m, registry) for m in GATEWAY_METRICS}
        self._serve = {m.name: serve_metric(m.name) for m in GATEWAY_METRICS}

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

    def auth_rejection(self, key_name: str, code: int) -> None:
        self._inc("pagedserve_auth_rejections", key_name=key_name, code=str(code))

    def _inc(self, name: str, **tags: str) -> None:
        prom = self._prom[name]
        (prom.labels(**tags) if tags else prom).inc()
        self._serve[name].inc(tags=tags or None)
