"""Every metric pagedserve exports, in one list: the code registers its metrics from here and
the Grafana dashboard (`cluster/grafana_panels.py`) is generated from here, so they cannot drift.

The list sits on the package's bottom floor (beside `config.py`) because the ingress, the
router, the replicas and the autoscaler all register through it. It imports no Ray: only
`serve_metric`, which runs inside Ray processes, imports `ray.serve.metrics`.

All of them go through `ray.serve.metrics`, so they show in the Ray dashboard and in Ray's
Prometheus export, where each name gets a `ray_` prefix and counters a `_total` suffix (a
histogram exports `_bucket`, `_sum` and `_count`). Serve adds the `deployment`, `replica` and
`application` tags inside a deployment; the tags listed here come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
PHASE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
KINDS = ("counter", "gauge", "histogram")
# Features some metrics need configured before they have values (the gateway's).
RESPONSE_CACHE, API_KEYS, ROLLOUT = "response_cache", "api_keys", "rollout"
FEATURES = {RESPONSE_CACHE: "the response cache (`cache:`)", API_KEYS: "an API key",
            ROLLOUT: "a rollout (`rollout:`)"}


@dataclass(frozen=True)
class Metric:
    """One exported metric. `source`: the process that records it (ingress, router, replica,
    autoscaler). `on_http`: the ingress's own registry has it too, so `/metrics` serves it
    without the `ray_` prefix as well (every metric is there under its `exported` name, from
    the nodes' Ray exports). `needs`: a feature that must be configured before it has values."""

    name: str
    kind: str
    help: str
    source: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    on_http: bool = False
    needs: str | None = None

    @property
    def exported(self) -> str:
        """The series name in Ray's Prometheus export (histograms: the `_bucket` series)."""
        suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}[self.kind]
        return f"ray_{self.name}{suffix}"

    @property
    def http_name(self) -> str:
        """The series name of the ingress's own registry on `/metrics` (no `ray_` prefix)."""
        return self.exported.removeprefix("ray_")


def _m(name: str, kind: str, help: str, source: str, **kw) -> Metric:
    return Metric(f"pagedserve_{name}", kind, help, source, **kw)


METRICS: tuple[Metric, ...] = (
    # traffic (ingress)
    _m("requests", "counter", "finished requests by HTTP status code and endpoint", "ingress",
       tags=("status", "endpoint"), on_http=True),
    _m("generated_tokens", "counter", "output tokens sent to clients", "ingress", on_http=True),
    # latency (ingress, router)
    _m("ttft_s", "histogram", "time to first token, seconds", "ingress",
       boundaries=LATENCY_BUCKETS_S, on_http=True),
    _m("tpot_s", "histogram", "time per output token after the first, seconds", "ingress",
       boundaries=TOKEN_BUCKETS_S, on_http=True),
    _m("e2e_s", "histogram", "end-to-end latency of successful requests, seconds", "ingress",
       boundaries=LATENCY_BUCKETS_S, on_http=True),
    _m("queue_s", "histogram", "time a request waited in the router for a replica, seconds",
       "router", boundaries=LATENCY_BUCKETS_S),
    # gateway (ingress): response cache and API keys
    _m("response_cache_hits", "counter", "requests answered from the response cache", "ingress",
       tags=("level",), on_http=True, needs=RESPONSE_CACHE),
    _m("response_cache_misses", "counter", "cacheable requests not found in the response cache",
       "ingress", on_http=True, needs=RESPONSE_CACHE),
    _m("response_cache_errors", "counter", "response cache reads or writes that failed",
       "ingress", tags=("level",), on_http=True, needs=RESPONSE_CACHE),
    _m("response_cache_bytes", "gauge", "bytes held by the response cache", "ingress",
       tags=("level",), on_http=True, needs=RESPONSE_CACHE),
    _m("auth_rejections", "counter", "requests rejected by API-key checks or rate limits",
       "ingress", tags=("key_name", "code"), on_http=True, needs=API_KEYS),
    # router: admission and replicas
    _m("router_queue_len", "gauge", "requests waiting in the router for a replica", "router",
       on_http=True),
    _m("router_oldest_wait_s", "gauge", "how long the oldest queued request has waited, seconds",
       "router", on_http=True),
    _m("admissions", "counter", "requests the router admitted, per replica", "router",
       tags=("replica_id",)),
    _m("replicas", "gauge", "replicas of the model by state: serving, starting, draining, parked",
       "router", tags=("state",), on_http=True),
    # router: a rollout of a new model version
    _m("rollout_state", "gauge", "the new model version: 0 judged, 1 promoted, -1 rolled back",
       "router", needs=ROLLOUT),
    _m("rollout_requests", "counter", "requests of a rollout by model version and outcome",
       "router", tags=("version", "outcome"), needs=ROLLOUT),
    # autoscaler
    _m("scale_events", "counter", "autoscaling decisions that changed the replica target, by "
       "direction (up/down) and reason", "autoscaler", tags=("direction", "reason")),
    # replica: engine
    _m("replica_running", "gauge", "sequences in the replica's running batch", "replica",
       on_http=True),
    _m("replica_waiting", "gauge", "sequences admitted to the engine but not started", "replica",
       on_http=True),
    _m("preemptions", "counter", "sequences preempted (recomputed later) when KV blocks ran out",
       "replica"),
    _m("replica_free_blocks", "gauge", "free KV-cache blocks", "replica", on_http=True),
    _m("replica_kv_usage", "gauge", "fraction of KV-cache blocks in use", "replica", on_http=True),
    _m("prefix_cache_hit_tokens", "counter", "prompt tokens found in the prefix cache", "replica"),
    _m("prefix_cache_queried_tokens", "counter", "prompt tokens looked up in the prefix cache",
       "replica"),
    _m("engine_steps", "counter", "engine steps (one batch forward each)", "replica"),
    _m("engine_step_seconds", "counter", "wall time spent in engine steps, seconds", "replica"),
    # replica: start-up
    _m("replica_startup_seconds", "histogram", "wall time of each phase of a replica's start",
       "replica", tags=("phase", "weights_from"), boundaries=PHASE_BUCKETS_S),
    _m("replica_starts", "counter", "replicas started, by where their weights came from",
       "replica", tags=("weights_from",)),
)
BY_NAME = {m.name: m for m in METRICS}


def spec(name: str) -> Metric:
    """The list's entry for `name` (with or without the `pagedserve_` prefix)."""
    full = name if name.startswith("pagedserve_") else f"pagedserve_{name}"
    try:
        return BY_NAME[full]
    except KeyError:
        raise KeyError(f"{full} is not in pagedserve.metric_list.METRICS; add it there "
                       "(the dashboard is generated from that list)") from None


def serve_metric(name: str):
    """The `ray.serve.metrics` object for `name`, built from its list entry."""
    from ray.serve import metrics as serve_metrics

    metric = spec(name)
    kwargs = {"description": metric.help, "tag_keys": metric.tags or None}
    if metric.kind == "counter":
        return serve_metrics.Counter(metric.name, **kwargs)
    if metric.kind == "gauge":
        return serve_metrics.Gauge(metric.name, **kwargs)
    return serve_metrics.Histogram(metric.name, boundaries=list(metric.boundaries), **kwargs)


def serve_metrics_for(source: str) -> dict[str, object]:
    """Every metric `source` records, keyed by name without the `pagedserve_` prefix."""
    return {m.name.removeprefix("pagedserve_"): serve_metric(m.name)
            for m in METRICS if m.source == source and m.needs is None}
