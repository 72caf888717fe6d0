"""Request metrics of the ingress, exported twice.

Through `ray.serve.metrics` they reach the Ray dashboard and Ray's Prometheus export (with a
`ray_` prefix and deployment/replica tags). `/metrics` on the ingress also renders them in
Prometheus text, together with the router's cluster-wide view (queue, replicas, KV blocks), so
a scraper pointed at the HTTP endpoint alone sees the whole service.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray.serve import metrics as serve_metrics

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
_HISTOGRAMS = {
    "ttft_s": ("time to first token", LATENCY_BUCKETS_S),
    "tpot_s": ("time per output token after the first", TOKEN_BUCKETS_S),
    "e2e_s": ("end-to-end request latency", LATENCY_BUCKETS_S),
    "queue_s": ("time waiting in the router for a replica", LATENCY_BUCKETS_S),
}


class IngressMetrics:
    """Histograms of TTFT, TPOT, end-to-end and queue time, and request counts by status."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._prom = {
            key: Histogram(f"pagedserve_{key}", text, registry=self.registry, buckets=buckets)
            for key, (text, buckets) in _HISTOGRAMS.items()
        }
        self._serve = {
            key: serve_metrics.Histogram(f"pagedserve_{key}", description=text, boundaries=buckets)
            for key, (text, buckets) in _HISTOGRAMS.items()
        }
        self._requests = Counter("pagedserve_requests", "finished requests by HTTP status",
                                 ["status"], registry=self.registry)
        self._serve_requests = serve_metrics.Counter(
            "pagedserve_requests", description="finished requests by HTTP status",
            tag_keys=("status",))
        self._tokens = Counter("pagedserve_generated_tokens", "generated tokens",
                               registry=self.registry)
        self._cluster = {
            name: Gauge(f"pagedserve_{name}", text, registry=self.registry)
            for name, text in (("router_queue_len", "requests waiting in the router"),
                               ("router_oldest_wait_s", "longest current wait in the router"),
                               ("replicas_ready", "replicas reporting to the router"))
        }
        self._per_replica = {
            name: Gauge(f"pagedserve_replica_{name}", text, ["replica"], registry=self.registry)
            for name, text in (("running", "running sequences"), ("waiting", "waiting sequences"),
                               ("free_blocks", "free KV blocks"))
        }

    def observe(self, key: str, seconds: float) -> None:
        self._prom[key].observe(seconds)
        self._serve[key].observe(seconds)

    def count_request(self, status: int, tokens: int = 0) -> None:
        self._requests.labels(status=str(status)).inc()
        self._serve_requests.inc(tags={"status": str(status)})
        if tokens:
            self._tokens.inc(tokens)

    def render(self, router_stats: dict | None) -> bytes:
        """Prometheus text: this ingress's request metrics plus the router's cluster view."""
        if router_stats is not None:
            self._cluster["router_queue_len"].set(router_stats["queue_len"])
            self._cluster["router_oldest_wait_s"].set(router_stats["oldest_wait_s"])
            self._cluster["replicas_ready"].set(len(router_stats["replicas"]))
            for gauge in self._per_replica.values():
                gauge.clear()  # replicas that stopped reporting disappear
            for rid, rep in router_stats["replicas"].items():
                self._per_replica["running"].labels(replica=rid).set(rep["num_running"])
                self._per_replica["waiting"].labels(replica=rid).set(rep["num_waiting"])
                self._per_replica["free_blocks"].labels(replica=rid).set(rep["num_free_blocks"])
        return generate_latest(self.registry)
