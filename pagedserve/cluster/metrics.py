"""Request metrics of the ingress, exported twice, both from `pagedserve.metric_list`.

Through `ray.serve.metrics` they reach the Ray dashboard and Ray's Prometheus export (with a
`ray_` prefix and deployment/replica tags). `/metrics` on the ingress serves, in Prometheus text,
every `ray_pagedserve_*` family of the cluster's Ray exports (`node_exports.py`; the same names,
so the dashboard's queries work against either), and beside them this ingress's own registry
without the prefix: its request metrics up to the moment and the router's live view (queue,
replicas by state, each replica's batch and KV blocks).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric as Family

from pagedserve.cluster.metrics_merge import merge_families, render
from pagedserve.metric_list import METRICS, Metric, serve_metrics_for

_PROM_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
# The router's stats() keys behind each per-replica gauge rendered on /metrics.
_REPLICA_FIELDS = {"replica_running": "num_running", "replica_waiting": "num_waiting",
                   "replica_free_blocks": "num_free_blocks", "replica_kv_usage": "kv_usage"}


def prometheus_mirror(metric: Metric, registry: CollectorRegistry):
    """The prometheus_client twin of a list metric, for the ingress's `/metrics`."""
    labels = list(metric.tags) + (["replica"] if metric.source == "replica" else [])
    kwargs = {"buckets": metric.boundaries} if metric.kind == "histogram" else {}
    return _PROM_KINDS[metric.kind](metric.name, metric.help, labels, registry=registry, **kwargs)


class IngressMetrics:
    """TTFT, TPOT and end-to-end histograms, and requests by status and endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The gateway's metrics are its own (`gateway_metrics.py`), in the same registry.
        self._prom = {m.name.removeprefix("pagedserve_"): prometheus_mirror(m, self.registry)
                      for m in METRICS if m.on_http and m.needs is None}
        self._serve = serve_metrics_for("ingress")

    def observe(self, key: str, seconds: float) -> None:
        self._prom[key].observe(seconds)
        self._serve[key].observe(seconds)

    def count_request(self, status: int, tokens: int = 0, endpoint: str = "") -> None:
        tags = {"status": str(status), "endpoint": endpoint}
        self._prom["requests"].labels(**tags).inc()
        self._serve["requests"].inc(tags=tags)
        if tokens:
            self._prom["generated_tokens"].inc(tokens)
            self._serve["generated_tokens"].inc(tokens)

    def render(self, router_stats: dict | None, cluster: Iterable[Family] = (),
               notes: Iterable[str] = ()) -> bytes:
        """Prometheus text: this ingress's request metrics, the router's cluster view, and the
        `cluster` families (the nodes' Ray exports), each family once; `notes` as comments."""
        if router_stats is not None:
            self._prom["router_queue_len"].set(router_stats["queue_len"])
            self._prom["router_oldest_wait_s"].set(router_stats["oldest_wait_s"])
            for state, count in router_stats.get("replicas_by_state", {}).items():
                self._prom["replicas"].labels(state=state).set(count)
            for key in _REPLICA_FIELDS:
                self._prom[key].clear()  # replicas that stopped reporting disappear
            for rid, rep in router_stats["replicas"].items():
                for key, field in _REPLICA_FIELDS.items():
                    self._prom[key].labels(replica=rid).set(rep[field])
        return render(merge_families(self.registry.collect(), cluster), notes)
