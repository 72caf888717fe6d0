"""Metrics of the gateway: response cache hits, misses, errors and bytes; auth rejections.

Registered twice, as `cluster/metrics.py` does: through `ray.serve.metrics` (Ray dashboard and
Ray's Prometheus export) and in the ingress's own registry (its `/metrics` route).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from pagedserve.metric_list import serve_metric, spec

# Their names, kinds, tags and help come from the metric list (and so does the dashboard).
GATEWAY_METRICS = ("pagedserve_response_cache_hits", "pagedserve_response_cache_misses",
                   "pagedserve_response_cache_errors", "pagedserve_response_cache_bytes",
                   "pagedserve_auth_rejections")
_PROM = {"counter": Counter, "gauge": Gauge}


class GatewayMetrics:
    """One call per event; each updates both exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._prom = {}
        self._serve = {}
        for name in GATEWAY_METRICS:
            metric = spec(name)
            self._prom[name] = _PROM[metric.kind](name, metric.help, list(metric.tags),
                                                  registry=registry)
            self._serve[name] = serve_metric(name)

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
