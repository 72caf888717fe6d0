"""Observability end to end, on one local Ray cluster with the dashboard on.

After traffic that queues (so the autoscaler scales up), preempts (a small KV cache), hits the
prefix cache, fails (an unknown model) and, where the response cache exists, hits it: every
metric of the metric list is in Ray's Prometheus export and, cluster-wide under the same names,
in the ingress's `/metrics`; a real Prometheus scraping the cluster returns data for every panel
query of the generated Grafana dashboard, and headless Chromium shows the three deployments on
the dashboard's Serve page (and saves a screenshot). `pagedserve chat` and `pagedserve bench
serving` run against the same server.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_server import prometheus
from ray import serve
from ray_clusters import own_ray_cluster
from serve_logs import serve_tracebacks
from tiny_models import write_tiny_model
from transformers import PreTrainedTokenizerFast

from pagedserve.cluster.app import APP_NAME, build_app
from pagedserve.cluster.grafana_dashboard import dashboard, panel_metrics
from pagedserve.cluster.grafana_panels import PANELS
from pagedserve.config import ClusterConfig
from pagedserve.metric_list import API_KEYS, BY_NAME, METRICS, RESPONSE_CACHE
from pagedserve.replicas.parallel.rendezvous import free_port

pytestmark = pytest.mark.integration

HAS_CACHE = "cache" in ClusterConfig.model_fields
HAS_AUTH = "auth" in ClusterConfig.model_fields
API_KEY = "sk-observer-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"} if HAS_AUTH else {}
# Features some metrics need, and why this run may lack one (then its checks are skipped, by name).
UNCONFIGURED = {RESPONSE_CACHE: None if HAS_CACHE else "this build has no response cache "
                "(ClusterConfig has no `cache`)",
                API_KEYS: None if HAS_AUTH else "this build has no API keys "
                "(ClusterConfig has no `auth`)"}
CHAT_TEMPLATE = ("{% for m in messages %}w4 {{ m['content'] }} w5 {% endfor %}"
                 "{% if add_generation_prompt %}w6{% endif %}")
EXPORT_TIMEOUT_S = 90
SCALE_TIMEOUT_S = 90
BURST, BURST_TOKENS = 10, 200
REPO = Path(__file__).resolve().parents[2]
PROMPT = list(range(7, 47))  # 40 tokens: two full 16-token blocks for the prefix cache


def _model(root: Path) -> Path:
    """The tiny random model with a chat template (for chat completions and `pagedserve chat`)."""
    model = write_tiny_model(root / "tiny-chat", "llama-gqa-tied")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    return model


def _args(model: Path) -> dict:
    args = {
        "served_model_name": "tiny", "replica_num_cpus": 1, "torch_threads": 1,
        "engine": {"model": str(model), "device": "cpu", "dtype": "float32",
                   "num_kvcache_blocks": 24, "max_num_seqs": 2},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "ttft_target_s": 1.0,
                        "queue_wait_fraction": 0.2, "running_per_replica": 2,
                        "scale_down_after_s": 600, "look_back_period_s": 1.0,
                        "metrics_interval_s": 0.25, "membership_poll_s": 0.2},
    }
    if HAS_CACHE:  # L1, and an L2 Redis that is down: its errors are counted, no request fails
        args["cache"] = {"enabled": True, "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    if HAS_AUTH:
        args["auth"] = {"api_keys": [{"name": "observer", "key": API_KEY}]}
    return args


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster, the app on a free HTTP port, and Prometheus scraping Ray's export."""
    root = tmp_path_factory.mktemp("observability")
    model = _model(root)
    ports = {"metrics": free_port(), "dashboard": free_port(), "http": free_port()}
    with own_ray_cluster(num_cpus=4, include_dashboard=True, dashboard_port=ports["dashboard"],
                         _metrics_export_port=ports["metrics"]):
        serve.start(http_options={"host": "127.0.0.1", "port": ports["http"]})
        serve.run(build_app(_args(model)), name=APP_NAME, route_prefix="/")
        # One Prometheus scrapes Ray's export, the other only the ingress's /metrics.
        with (prometheus([f"127.0.0.1:{ports['metrics']}"], root / "ray-export") as prom,
              prometheus([f"127.0.0.1:{ports['http']}"], root / "ingress",
                         bearer_token=API_KEY if HAS_AUTH else None) as ingress_prom):
            yield {"base_url": f"http://127.0.0.1:{ports['http']}",
                   "prometheus": {"ray_export": prom, "ingress": ingress_prom},
                   "export_url": f"http://127.0.0.1:{ports['metrics']}/metrics",
                   "dashboard_url": f"http://127.0.0.1:{ports['dashboard']}", "root": root,
                   "logs": Path(ray._private.worker.global_worker.node.get_logs_dir_path())}


def _complete(base_url: str, prompt, max_tokens: int, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    return httpx.post(f"{base_url}/v1/completions", json=body, headers=HEADERS, timeout=300)


def _scale_events(export_url: str) -> bool:
    return BY_NAME["pagedserve_scale_events"].exported in httpx.get(export_url, timeout=10).text


@pytest.fixture(scope="module")
def traffic(cluster):
    """The traffic every check below reads; returns the statuses seen."""
    base = cluster["base_url"]
    # The same deterministic request twice: a response-cache hit where the cache exists.
    statuses = [_complete(base, PROMPT, 8).status_code for _ in range(2)]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8, "temperature": 0}
    statuses.append(httpx.post(f"{base}/v1/chat/completions", json=chat, headers=HEADERS,
                               timeout=120).status_code)
    statuses.append(httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "w7"},
                               headers=HEADERS, timeout=60).status_code)
    if HAS_AUTH:  # an auth rejection
        wrong = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "w7"},
                           headers={"Authorization": "Bearer sk-wrong-key"}, timeout=60)
        assert wrong.status_code == 401
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        # Queued work (a scale-up), more KV than 24 blocks hold (preemptions), and prompts
        # that share PROMPT's two full blocks (prefix-cache hits).
        burst = [pool.submit(_complete, base, PROMPT + [100 + i], BURST_TOKENS, stream=True)
                 for i in range(BURST)]
        deadline = time.monotonic() + SCALE_TIMEOUT_S
        while not _scale_events(cluster["export_url"]) and time.monotonic() < deadline:
            time.sleep(1)
        statuses += [f.result().status_code for f in burst]
    return statuses


def test_traffic_got_the_expected_answers(traffic):
    assert traffic[:3] == [200, 200, 200] and traffic[3] == 404
    assert traffic[4:] == [200] * BURST


def _skip_unconfigured(feature: str, what: list[str]) -> None:
    if UNCONFIGURED[feature]:
        pytest.skip(f"{UNCONFIGURED[feature]}; not checked: {', '.join(what)}")


def _missing_from_export(export_url: str, metrics, headers=None) -> list[str]:
    """Names of `metrics` not in the export at `export_url` (Ray's, or the ingress's
    `/metrics`), waiting for the export's next rounds."""
    missing, deadline = list(metrics), time.monotonic() + EXPORT_TIMEOUT_S
    while missing and time.monotonic() < deadline:
        response = httpx.get(export_url, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        text = response.text
        missing = [m for m in missing if m.exported not in text]
        time.sleep(2)
    return [m.exported for m in missing]


def test_every_metric_is_in_rays_export(cluster, traffic):
    core = [m for m in METRICS if m.needs is None]
    assert _missing_from_export(cluster["export_url"], core) == []


@pytest.mark.parametrize("feature", [RESPONSE_CACHE, API_KEYS])
def test_feature_metrics_are_in_rays_export(cluster, traffic, feature):
    metrics = [m for m in METRICS if m.needs == feature]
    _skip_unconfigured(feature, [m.name for m in metrics])
    assert _missing_from_export(cluster["export_url"], metrics) == []


def test_ingress_metrics_endpoint(cluster, traffic):
    """One scrape target is enough: the ingress's `/metrics` serves every metric of the list
    (the core, and the features this app configures) cluster-wide, named as in Ray's export,
    each family once; its own registry's series come beside them without the `ray_` prefix."""
    url = f"{cluster['base_url']}/metrics"
    configured = [m for m in METRICS if m.needs is None or UNCONFIGURED.get(m.needs, "") is None]
    assert _missing_from_export(url, configured, HEADERS) == []
    text = httpx.get(url, headers=HEADERS, timeout=10).text
    types = re.findall(r"^# TYPE (\S+)", text, re.M)
    assert sorted(types) == sorted(set(types)), "a family's HELP/TYPE lines came twice"
    # the replicas' series come from the replicas' processes, through their node's export
    assert re.search(r'^ray_pagedserve_engine_steps_total\{[^}]*deployment="Replica"', text, re.M)
    assert [m.http_name for m in configured if m.on_http
            and not re.search(rf"^{m.http_name}[{{ ]", text, re.M)] == []
    assert 'pagedserve_requests_total{endpoint="completions",status="404"} 1.0' in text
    assert 'endpoint="chat",status="200"' in text
    if HAS_AUTH:
        assert httpx.get(url, timeout=10).status_code == 401


def _runnable(expr: str) -> str:
    """A panel's query as Prometheus runs it: Grafana's rate window made concrete."""
    return expr.replace("$__rate_interval", "1m")


def _panel_need(title: str) -> str | None:
    panel = next(p for p in PANELS if p.title == title)
    return next((BY_NAME[n].needs for n in sorted(panel_metrics(panel)) if BY_NAME[n].needs),
                None)


def _empty_queries(prom, feature: str | None) -> list[tuple[str, str]]:
    """(panel, query) of the dashboard's queries that return no series, after waiting;
    the panels whose metrics need `feature` (None: need nothing)."""
    queries = [(p["title"], t["expr"]) for p in dashboard()["panels"] if p["type"] != "row"
               for t in p["targets"] if _panel_need(p["title"]) == feature]
    assert queries
    empty, deadline = queries, time.monotonic() + EXPORT_TIMEOUT_S
    while empty and time.monotonic() < deadline:
        empty = [(title, expr) for title, expr in empty if not prom.query(_runnable(expr))]
        time.sleep(2)
    return empty


SCRAPED = ["ray_export", "ingress"]  # what each Prometheus scrapes: the same queries work on both


@pytest.mark.parametrize("scraped", SCRAPED)
def test_every_panel_query_returns_data_from_prometheus(cluster, traffic, scraped):
    assert cluster["prometheus"][scraped].targets_up()
    assert _empty_queries(cluster["prometheus"][scraped], None) == []


@pytest.mark.parametrize("scraped", SCRAPED)
@pytest.mark.parametrize("feature", [RESPONSE_CACHE, API_KEYS])
def test_feature_panel_queries_return_data_from_prometheus(cluster, traffic, feature, scraped):
    titles = [p.title for p in PANELS if _panel_need(p.title) == feature]
    _skip_unconfigured(feature, titles)
    assert _empty_queries(cluster["prometheus"][scraped], feature) == []


def test_ray_dashboard_serve_page_in_headless_chromium(cluster, traffic):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is missing: apt-get install -y chromium")
    url = f"{cluster['dashboard_url']}/#/serve"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1400,1000", "--virtual-time-budget=15000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    for deployment in ("Ingress", "Router", "Replica"):
        assert f">{deployment}<" in dom, f"{deployment} is not listed on the Serve page"
    png = cluster["root"] / "ray-dashboard-serve.png"
    subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, timeout=120,
                   check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    if os.environ.get("PAGEDSERVE_SCREENSHOT"):  # where the README's copy is refreshed from
        shutil.copy(png, os.environ["PAGEDSERVE_SCREENSHOT"])


def test_no_traceback_in_serve_logs(cluster, traffic):
    assert serve_tracebacks(cluster["logs"]) == []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve.cli", *args]


CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           **({"PAGEDSERVE_API_KEY": API_KEY} if HAS_AUTH else {})}


def test_pagedserve_chat_in_a_terminal(cluster, traffic):
    """The chat on a pty, as a user types: two streamed turns, a /reset, /exit."""
    pexpect = pytest.importorskip("pexpect")
    argv = _cli("chat", "--url", cluster["base_url"], "--max-tokens", "6")
    child = pexpect.spawn(argv[0], argv[1:], env=CLI_ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("chatting with tiny")
        answers = []
        for text in ("hello there", "and again"):
            child.expect_exact("you> ")
            child.sendline(text)
            child.expect_exact("you> ")
            answers.append(child.before.replace(text, "", 1).strip())
            child.sendline("")  # an empty line is ignored: the prompt comes back
        assert all(a and "error" not in a for a in answers), answers
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(history cleared)")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_pagedserve_chat_reports_a_4xx_and_goes_on(cluster, traffic):
    pexpect = pytest.importorskip("pexpect")
    argv = _cli("chat", "--url", cluster["base_url"], "--model", "nope")
    child = pexpect.spawn(argv[0], argv[1:], env=CLI_ENV, encoding="utf-8", timeout=120)
    try:
        child.expect_exact("you> ")
        child.sendline("hi")
        child.expect("error: the server answered HTTP 404: .*nope")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_pagedserve_bench_serving(cluster, traffic, tmp_path):
    out = subprocess.run(_cli("bench", "serving", "--url", cluster["base_url"],
                              "--num-prompts", "6", "--input-len", "16", "--output-len", "8",
                              "--request-rate", "20", "--out", str(tmp_path)),
                         env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TTFT" in out.stdout and "6 requests, 0 errors" in out.stdout
    result = json.loads((tmp_path / "serving.json").read_text())
    assert result["output_tokens"] == 6 * 8 and result["model"] == "tiny"
    assert 0 < result["ttft_s"]["p50"] <= result["e2e_s"]["p99"]
    assert (tmp_path / "serving.png").read_bytes()[:4] == b"\x89PNG"
