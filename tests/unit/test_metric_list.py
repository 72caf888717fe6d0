"""The metric list is the only place metrics are declared, and every recorder uses it."""

import re
import time
from pathlib import Path

import pytest

from pagedserve.autoscale.policy import Signals, scale_reason
from pagedserve.cluster.metrics import IngressMetrics
from pagedserve.cluster.router_metrics import RouterMetrics, count_by_state
from pagedserve.config import AutoscaleConfig
from pagedserve.metric_list import BY_NAME, KINDS, METRICS, spec
from pagedserve.replicas.engine.engine_stats import EngineStats
from pagedserve.replicas.replica_metrics import ReplicaMetrics

PACKAGE = Path(__file__).resolve().parents[2] / "pagedserve"
SERVE_TAGS = {"deployment", "replica", "application", "route"}


def test_entries_are_well_formed():
    assert len(BY_NAME) == len(METRICS), "duplicate names"
    for m in METRICS:
        assert m.kind in KINDS and m.name.startswith("pagedserve_") and m.help
        assert not SERVE_TAGS & set(m.tags), f"{m.name}: Serve adds these tags itself"
        assert m.source in {"ingress", "router", "replica", "autoscaler"}
        if m.kind == "histogram":
            assert list(m.boundaries) == sorted(m.boundaries) and m.boundaries
    assert spec("ttft_s").exported == "ray_pagedserve_ttft_s_bucket"
    assert spec("requests").exported == "ray_pagedserve_requests_total"
    with pytest.raises(KeyError, match="not in pagedserve.metric_list"):
        spec("no_such_metric")


def test_no_metric_is_declared_outside_the_list():
    pattern = re.compile(r"^\s*(from ray\.serve\.metrics import|import ray\.serve\.metrics|"
                         r"from ray\.serve import .*\bmetrics\b|from ray\.util\.metrics import|"
                         r"from ray\.util import .*\bmetrics\b|"
                         r"from prometheus_client import .*\b(Counter|Gauge|Histogram)\b)", re.M)
    allowed = {"metric_list.py", "cluster/metrics.py"}  # the list, and /metrics' mirror
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if pattern.search(p.read_text()) and str(p.relative_to(PACKAGE)) not in allowed]
    assert offenders == []
    ingress = (PACKAGE / "cluster" / "metrics.py").read_text()
    assert not re.search(r"[\"']pagedserve_[a-z]", ingress)  # names come from the list


def test_replicas_by_state():
    reporting = {"a": False, "b": False, "c": True, "d": False}
    serve = {"a": "RUNNING", "b": "RUNNING", "c": "RUNNING", "d": "STOPPING",
             "e": "STARTING", "f": "STOPPING"}
    assert count_by_state(reporting, {"b"}, serve) == {
        "serving": 1, "parked": 1, "draining": 3, "starting": 1}
    assert count_by_state({"a": False}, (), None) == {
        "serving": 1, "parked": 0, "draining": 0, "starting": 0}


def _signals(**kw) -> Signals:
    base = dict(now=0.0, current_replicas=1, target_replicas=1, queue_len=0, oldest_wait_s=0.0,
                num_running=0, max_kv_usage=0.0, recent_ttft_s=0.0, running_per_replica=4)
    return Signals(**{**base, **kw})


def test_scale_reasons():
    config = AutoscaleConfig(min_replicas=1, max_replicas=3, ttft_target_s=1.0,
                             queue_wait_fraction=0.5)
    assert scale_reason(_signals(queue_len=3, oldest_wait_s=0.6), 2, config) == "queue_wait"
    assert scale_reason(_signals(queue_len=3, recent_ttft_s=2.0), 2, config) == "ttft"
    assert scale_reason(_signals(queue_len=1, current_replicas=0, target_replicas=0), 1,
                        config) == "no_replica"
    assert scale_reason(_signals(target_replicas=2), 1, config) == "low_load"
    assert scale_reason(_signals(target_replicas=0), 1, config) == "min_replicas"


def test_recorders_use_only_names_in_the_list():
    """Each recorder registers from the list and records every metric it owns (no Ray needed:
    outside a cluster the records go nowhere, but a wrong key or tag raises)."""
    ingress = IngressMetrics()
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        ingress.observe(key, 0.1)
    ingress.count_request(200, tokens=3, endpoint="completions")
    text = ingress.render({"queue_len": 2, "oldest_wait_s": 0.5,
                           "replicas_by_state": {"serving": 1, "parked": 0},
                           "replicas": {"r1": {"num_running": 1, "num_waiting": 0,
                                               "num_free_blocks": 7, "kv_usage": 0.5}}}).decode()
    for m in METRICS:
        if m.on_http and m.needs is None:  # the gateway renders its own
            assert m.http_name in text, m.name
    assert 'pagedserve_requests_total{endpoint="completions",status="200"} 1.0' in text
    router = RouterMetrics()
    router.admitted("r1", 0.2)
    router.update(1, 0.3, {"r1": False}, set())
    assert router.by_state["serving"] == 1
    replica = ReplicaMetrics()
    for steps in (3, 5, 0):  # the last one: an engine whose totals went back
        replica.record(EngineStats(1, 0, 10, 20, 0.5, 1, num_prefix_hit_tokens=16,
                                   num_prefix_queried_tokens=32, num_steps=steps,
                                   step_seconds=0.01 * steps))


def test_gateway_sets_the_cache_size_again_while_it_does_not_change(monkeypatch):
    """Ray's export drops a gauge a process stops setting; the size must keep being set."""
    from prometheus_client import CollectorRegistry

    from pagedserve.cluster import gateway_metrics

    monkeypatch.setattr(gateway_metrics, "GAUGE_REFRESH_S", 0.05)
    metrics = gateway_metrics.GatewayMetrics(CollectorRegistry())
    sets = []
    gauge = metrics._serve["pagedserve_response_cache_bytes"]
    monkeypatch.setattr(gauge, "set", lambda value, tags=None: sets.append((value, tags)))
    metrics.cache_bytes("l1", 123)
    deadline = time.monotonic() + 5
    while len(sets) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sets) >= 4 and all(s == (123, {"level": "l1"}) for s in sets)
