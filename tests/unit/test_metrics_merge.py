"""`/metrics` merges the nodes' Ray exports with the ingress's own registry (no Ray needed)."""

import asyncio
import re

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.cluster.metrics import IngressMetrics
from pagedserve.cluster.metrics_merge import merge_families, parse_export, render
from pagedserve.cluster.node_exports import NodeExports, export_urls


def _export(node: str, steps: float, replica: str = "r1") -> str:
    """A node's Ray export as Ray 2.60 writes it: pagedserve's families among Ray's own."""
    tags = f'NodeAddress="{node}",deployment="Replica",replica="{replica}"'
    return (
        "# HELP ray_node_cpu_count cpus\n# TYPE ray_node_cpu_count gauge\n"
        f'ray_node_cpu_count{{NodeAddress="{node}"}} 2.0\n'
        "# HELP ray_pagedserve_engine_steps_total engine steps (one batch forward each)\n"
        "# TYPE ray_pagedserve_engine_steps_total counter\n"
        f"ray_pagedserve_engine_steps_total{{{tags}}} {steps}\n"
        "# HELP ray_pagedserve_queue_s time a request waited\n"
        "# TYPE ray_pagedserve_queue_s histogram\n"
        f'ray_pagedserve_queue_s_bucket{{{tags},le="0.1"}} 1.0\n'
        f'ray_pagedserve_queue_s_bucket{{{tags},le="+Inf"}} 2.0\n'
        f"ray_pagedserve_queue_s_count{{{tags}}} 2.0\n"
        f"ray_pagedserve_queue_s_sum{{{tags}}} 0.7\n")


def _type_lines(text: str) -> list[str]:
    return re.findall(r"^# TYPE (\S+)", text, re.M)


def test_parse_export_keeps_only_pagedserve_families():
    families = parse_export(_export("10.0.0.1", 5))
    assert [(f.name, f.type) for f in families] == [
        ("ray_pagedserve_engine_steps", "counter"), ("ray_pagedserve_queue_s", "histogram")]
    assert len(families[1].samples) == 4


def test_families_of_several_nodes_become_one_each_with_every_series():
    merged = merge_families(parse_export(_export("10.0.0.1", 5, "r1")),
                            parse_export(_export("10.0.0.2", 7, "r2")))
    text = render(merged).decode()
    assert _type_lines(text) == ["ray_pagedserve_engine_steps_total", "ray_pagedserve_queue_s"]
    assert text.count("# HELP ray_pagedserve_engine_steps_total") == 1
    steps = [s for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "ray_pagedserve_engine_steps_total"]
    assert sorted((s.labels["replica"], s.value) for s in steps) == [("r1", 5.0), ("r2", 7.0)]


def test_a_series_listed_twice_is_served_once_the_first_source_winning():
    first, again = parse_export(_export("10.0.0.1", 5)), parse_export(_export("10.0.0.1", 9))
    text = render(merge_families(first, again)).decode()
    assert re.findall(r"^ray_pagedserve_engine_steps_total\{.*\} (\S+)$", text, re.M) == ["5.0"]
    assert len(re.findall(r"^ray_pagedserve_queue_s_bucket", text, re.M)) == 2


def test_a_family_of_another_type_under_a_taken_name_is_dropped():
    gauge = parse_export("# TYPE ray_pagedserve_queue_s gauge\nray_pagedserve_queue_s 3.0\n")
    merged = merge_families(parse_export(_export("10.0.0.1", 5)), gauge)
    queue = next(f for f in merged if f.name == "ray_pagedserve_queue_s")
    assert queue.type == "histogram" and len(queue.samples) == 4


def test_notes_are_comments_a_parser_ignores():
    text = render(parse_export(_export("10.0.0.1", 5)), ["not answering, skipped: x"]).decode()
    assert text.startswith("# not answering, skipped: x\n")
    assert len(list(text_string_to_metric_families(text))) == 2


def test_ingress_render_serves_its_own_registry_and_the_cluster_families():
    ingress = IngressMetrics()
    ingress.count_request(404, endpoint="completions")
    text = ingress.render(None, parse_export(_export("10.0.0.1", 5))).decode()
    assert 'pagedserve_requests_total{endpoint="completions",status="404"} 1.0' in text
    assert "ray_pagedserve_engine_steps_total{" in text
    types = _type_lines(text)
    assert len(types) == len(set(types)), "a family's TYPE line twice"
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {"pagedserve_ttft_s_bucket", "ray_pagedserve_queue_s_bucket"} <= names


def test_own_registry_first_wins_over_a_same_named_export():
    registry = CollectorRegistry()
    Counter("ray_pagedserve_engine_steps", "mine", ["NodeAddress", "deployment", "replica"],
            registry=registry).labels("10.0.0.1", "Replica", "r1").inc(42)
    text = render(merge_families(registry.collect(),
                                 parse_export(_export("10.0.0.1", 5)))).decode()
    assert re.findall(r"^ray_pagedserve_engine_steps_total\{.*\} (\S+)$", text, re.M) == ["42.0"]


NODES = [
    {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
    {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},  # listed twice
    {"Alive": True, "NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 8080},
    {"Alive": True, "NodeManagerAddress": "10.0.0.3", "MetricsExportPort": 8080},
    {"Alive": False, "NodeManagerAddress": "10.0.0.4", "MetricsExportPort": 8080},
    {"Alive": True, "NodeManagerAddress": "10.0.0.5", "MetricsExportPort": 0},  # no export yet
]


def test_export_urls_are_the_alive_nodes_each_once():
    assert export_urls(NODES) == [f"http://10.0.0.{i}:8080/metrics" for i in (1, 2, 3)]


class _Nodes:
    """Answers like each node's metrics agent; a host in `down` times out."""

    def __init__(self, down: set[str]) -> None:
        self.down, self.calls = down, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.host)
        if request.url.host in self.down:
            raise httpx.ConnectTimeout("timed out", request=request)
        return httpx.Response(200, text=_export(request.url.host, 5, request.url.host))


def _replicas(families) -> list[str]:
    return sorted(s.labels["replica"] for f in families for s in f.samples
                  if s.name == "ray_pagedserve_engine_steps_total")


def test_node_exports_skip_a_node_that_does_not_answer_and_cache_a_round():
    handler = _Nodes(down={"10.0.0.3"})
    exports = NodeExports(lambda: NODES, ttl_s=60, transport=httpx.MockTransport(handler))

    async def twice():
        return await exports.families(), await exports.families()

    first, second = asyncio.run(twice())
    assert first is second and sorted(handler.calls) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert _replicas(first) == ["10.0.0.1", "10.0.0.2"]
    assert exports.failing == {"http://10.0.0.3:8080/metrics"} and exports.skipped == 1


def test_node_exports_fetch_again_after_the_ttl_and_take_a_node_back():
    handler = _Nodes(down={"10.0.0.3"})
    exports = NodeExports(lambda: NODES[2:4], ttl_s=0, transport=httpx.MockTransport(handler))

    async def rounds():
        first = await exports.families()
        handler.down.clear()
        return first, await exports.families()

    first, second = asyncio.run(rounds())
    assert _replicas(first) == ["10.0.0.2"] and _replicas(second) == ["10.0.0.2", "10.0.0.3"]
    assert exports.failing == set() and exports.skipped == 1 and len(handler.calls) == 4


def test_node_exports_without_a_node_list_serve_nothing_rather_than_fail():
    def gcs_down():
        raise ConnectionError("GCS unreachable")

    assert asyncio.run(NodeExports(gcs_down).families()) == []
