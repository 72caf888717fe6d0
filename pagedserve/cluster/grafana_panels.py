"""The Grafana dashboard's rows and panels: PromQL over the metric list's exported names.

Every metric of `pagedserve.metric_list` is drawn by at least one panel (a unit test checks it),
and every name a panel uses comes from the list (`_s(name)` raises for one that is not there).
`$__rate_interval` is Grafana's; the tests replace it to run the queries on Prometheus itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.metric_list import spec

RATE = "$__rate_interval"
ROWS = ("Traffic", "Latency", "Engine", "KV and caches", "Replicas and scaling")


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    row: str
    title: str
    unit: str
    targets: tuple[Target, ...]
    description: str = ""


def _s(name: str, suffix: str | None = None) -> str:
    """The exported series of a list metric; `suffix` picks a histogram's _sum/_count."""
    metric = spec(name)
    if suffix is None:
        return metric.exported
    if metric.kind != "histogram":
        raise ValueError(f"{metric.name} is a {metric.kind}, it has no {suffix} series")
    return f"ray_{metric.name}{suffix}"


def _rate(name: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({_s(name)}[{RATE}]))"


def _quantiles(name: str) -> tuple[Target, ...]:
    return tuple(Target(f"histogram_quantile({q}, sum by (le) (rate({_s(name)}[{RATE}])))",
                        f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99))


def _ratio(num: str, den: str) -> str:
    return f"{num} / {den}"


P = Panel
PANELS: tuple[Panel, ...] = (
    P("Traffic", "Requests per second by status and endpoint", "reqps",
      (Target(_rate("requests", "status, endpoint"), "{{endpoint}} {{status}}"),)),
    P("Traffic", "Generated tokens per second", "short",
      (Target(_rate("generated_tokens"), "tokens/s"),)),
    P("Traffic", "Admissions per second by replica", "reqps",
      (Target(_rate("admissions", "replica_id"), "{{replica_id}}"),)),
    P("Traffic", "API-key rejections per second", "reqps",
      (Target(_rate("auth_rejections", "key_name, code"), "{{key_name}} {{code}}"),),
      "401 (bad or missing key) and 429 (rate limit)"),
    P("Latency", "Time to first token", "s", _quantiles("ttft_s")),
    P("Latency", "Time per output token", "s", _quantiles("tpot_s")),
    P("Latency", "End-to-end latency", "s", _quantiles("e2e_s")),
    P("Latency", "Queue time in the router", "s", _quantiles("queue_s")),
    P("Engine", "Running and waiting sequences", "short",
      (Target(f"sum by (replica) ({_s('replica_running')})", "running {{replica}}"),
       Target(f"sum by (replica) ({_s('replica_waiting')})", "waiting {{replica}}"))),
    P("Engine", "Preemptions per second", "short",
      (Target(_rate("preemptions", "replica"), "{{replica}}"),)),
    P("Engine", "Mean engine step time", "s",
      (Target(_ratio(_rate("engine_step_seconds", "replica"), _rate("engine_steps", "replica")),
              "{{replica}}"),)),
    P("Engine", "Engine steps per second", "short",
      (Target(_rate("engine_steps", "replica"), "{{replica}}"),)),
    P("KV and caches", "KV-cache usage", "percentunit",
      (Target(f"max by (replica) ({_s('replica_kv_usage')})", "{{replica}}"),)),
    P("KV and caches", "Free KV-cache blocks", "short",
      (Target(f"sum by (replica) ({_s('replica_free_blocks')})", "{{replica}}"),)),
    P("KV and caches", "Prefix-cache hit rate (tokens)", "percentunit",
      (Target(_ratio(_rate("prefix_cache_hit_tokens"), _rate("prefix_cache_queried_tokens")),
              "hit rate"),),
      "prompt tokens found in the replicas' prefix caches over prompt tokens looked up"),
    P("KV and caches", "Response-cache hit rate", "percentunit",
      (Target(_ratio(_rate("response_cache_hits"),
                     f"({_rate('response_cache_hits')} + {_rate('response_cache_misses')})"),
              "hit rate"),)),
    P("KV and caches", "Response-cache hits and errors per second by level", "short",
      (Target(_rate("response_cache_hits", "level"), "hits {{level}}"),
       Target(_rate("response_cache_errors", "level"), "errors {{level}}"))),
    P("KV and caches", "Response-cache size", "bytes",
      (Target(f"sum by (level) ({_s('response_cache_bytes')})", "{{level}}"),)),
    P("Replicas and scaling", "Replicas by state", "short",
      (Target(f"max by (state) ({_s('replicas')})", "{{state}}"),)),
    P("Replicas and scaling", "Router queue", "short",
      (Target(f"max ({_s('router_queue_len')})", "queued"),
       Target(f"max ({_s('router_oldest_wait_s')})", "oldest wait (s)"))),
    P("Replicas and scaling", "Scale events", "short",
      (Target(f"sum by (direction, reason) ({_s('scale_events')})", "{{direction}} {{reason}}"),),
      "autoscaling decisions since the application started, by direction and reason"),
    P("Replicas and scaling", "Rollout", "short",
      (Target(f"max ({_s('rollout_state')})", "state (1 promoted, -1 rolled back)"),
       Target(_rate("rollout_requests", "version, outcome"), "{{version}} {{outcome}} /s")),
      "a new model version's canary: its decision, and requests by version and outcome"),
    P("Replicas and scaling", "Replica starts by weight source", "short",
      (Target(f"sum by (weights_from) ({_s('replica_starts')})", "{{weights_from}}"),)),
    P("Replicas and scaling", "Mean replica start-up phase", "s",
      (Target(_ratio(f"sum by (phase) ({_s('replica_startup_seconds', '_sum')})",
                     f"sum by (phase) ({_s('replica_startup_seconds', '_count')})"),
              "{{phase}}"),)),
)
