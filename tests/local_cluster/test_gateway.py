"""The shipped gateway config (`ray_configs/gateway.yaml`) served by `serve run`, against a real
redis-server this module starts: the response cache (L1 per ingress, Redis L2 shared by both
ingress replicas), API keys on every route but the probes, and per-key limits kept in Redis.

The config is the shipped one with its port, Redis address and TTL changed, plus one key with a
small request budget. It is served twice: behind Serve's own HTTP proxy, and in Serve's HAProxy
mode (`RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy on the HTTP port, each ingress replica serving
HTTP on a port of its own). Tests of the cache's and the limiter's own logic, which the proxy in
front cannot change, run behind Serve's proxy only.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray_clusters import leave_ray_cluster
from redis_server import RedisServer, free_port
from serve_cli import REPO, serve_run
from serve_logs import ingress_replicas_of, logs_dir, request_log_lines, serve_tracebacks

from pagedserve.bench.serve_process import haproxy_environment, ray_address

pytestmark = pytest.mark.integration
SERVE_PROXY, HAPROXY = "serve-proxy", "haproxy"
# Behind HAProxy an ingress replica that stops stays reachable 30 s first, so load balancers
# can drop it; nothing balances over a test's cluster when it is stopped.
NO_DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}

MODEL = "SmolLM2-135M-Instruct"
TEAM_A = {"Authorization": "Bearer sk-team-a-change-me"}
TIGHT = {"Authorization": "Bearer sk-tight-limit-key"}
TIGHT_LIMIT = 6  # requests per minute
TTL_S = 4.0


def _config(port: int, redis_url: str) -> dict:
    config = yaml.safe_load((REPO / "ray_configs" / "gateway.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["cache"].update(redis_url=redis_url, ttl_s=TTL_S)
    args["auth"]["redis_url"] = redis_url
    args["auth"]["api_keys"].append({"name": "tight", "key": TIGHT["Authorization"][7:],
                                     "rate_limit": {"requests_per_min": TIGHT_LIMIT}})
    return config


@dataclass
class Served:
    """The gateway as one proxy mode serves it."""

    mode: str  # SERVE_PROXY or HAPROXY
    url: str
    redis: RedisServer
    logs: Path  # the Ray cluster's logs directory
    env: dict[str, str]  # what `serve run` got besides the usual environment


@pytest.fixture(scope="module", params=[SERVE_PROXY, HAPROXY])
def gateway(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"gateway-{request.param}")
    redis = RedisServer(tmp)
    redis.start()
    port = free_port()
    config_path = tmp / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(_config(port, redis.url)))
    base_url = f"http://127.0.0.1:{port}"
    env = {**haproxy_environment(), **NO_DRAIN} if request.param == HAPROXY else {}
    try:
        with serve_run(config_path, base_url, tmp / "serve.log", env=env) as proc:
            ray.init(address=ray_address(proc), logging_level="warning", log_to_driver=False)
            try:
                yield Served(request.param, base_url, redis, logs_dir(), env)
            finally:
                leave_ray_cluster()
    finally:
        redis.stop()


@pytest.fixture
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120) as http:
        yield http


def _behind_serve_proxy_only(gateway: Served) -> None:
    if gateway.mode != SERVE_PROXY:
        pytest.skip("the cache's or limiter's own logic: the proxy in front does not change it")


def _chat(question: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "max_tokens": 8, "temperature": 0, **fields}


def _fresh(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}: name a colour."


def _post(client, body: dict, path: str = "/v1/chat/completions", headers=TEAM_A):
    reply = client.post(path, json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply


def _stream(client, body: dict) -> tuple[str, list[dict]]:
    with client.stream("POST", "/v1/chat/completions", headers=TEAM_A,
                       json={**body, "stream": True,
                             "stream_options": {"include_usage": True}}) as reply:
        assert reply.status_code == 200
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
        status = reply.headers.get("x-pagedserve-cache")
    assert events[-1] == "[DONE]"
    return status, [json.loads(e) for e in events[:-1]]


def _joined(chunks: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for chunk in chunks
                   for c in chunk["choices"])


def _metric(client, name: str, **labels) -> float:
    """The largest value of one sample across a few scrapes (each lands on one ingress)."""
    best = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for _ in range(6):
        text = _post_get(client, "/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") and all(label in line for label in want):
                best = max(best, float(line.rsplit(" ", 1)[1]))
    return best


def _post_get(client, path: str):
    reply = client.get(path, headers=TEAM_A)
    assert reply.status_code == 200, reply.text
    return reply


def test_miss_then_hit_with_the_same_text(client):
    body = _chat(_fresh("unary"))
    first = _post(client, body)
    second = _post(client, body)
    assert first.headers["x-pagedserve-cache"] == "miss"
    assert second.headers["x-pagedserve-cache"] == "hit"
    a, b = first.json(), second.json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    assert a["id"] != b["id"]


def test_streamed_hit_joins_to_the_live_text_with_usage(client):
    body = _chat(_fresh("stream"))
    live_status, live = _stream(client, body)
    hit_status, replay = _stream(client, body)
    assert (live_status, hit_status) == ("miss", "hit")
    assert _joined(replay) == _joined(live) != ""
    assert replay[-1]["usage"] == live[-1]["usage"] and replay[-1]["choices"] == []
    assert replay[0]["id"] != live[0]["id"]
    assert _post(client, body).json()["choices"][0]["message"]["content"] == _joined(live)


def test_two_ingress_replicas_share_l2(client):
    body = _chat(_fresh("shared"))
    assert _post(client, body).headers["x-pagedserve-cache"] == "miss"
    levels = []
    for _ in range(30):  # the proxy spreads these over both ingress replicas
        reply = _post(client, body)
        levels.append((reply.headers["x-pagedserve-cache"],
                       reply.headers.get("x-pagedserve-cache-level")))
        if levels[-1][1] == "l2":
            break
    assert all(status == "hit" for status, _ in levels)
    assert ("hit", "l2") in levels  # the other replica's first lookup: found in Redis


def test_entries_expire_after_the_ttl(gateway, client):
    _behind_serve_proxy_only(gateway)
    body = _chat(_fresh("ttl"))
    _post(client, body)
    assert _post(client, body).headers["x-pagedserve-cache"] == "hit"
    time.sleep(TTL_S + 0.5)
    assert _post(client, body).headers["x-pagedserve-cache"] == "miss"


def test_sampled_requests_are_cached_only_with_a_seed(gateway, client):
    _behind_serve_proxy_only(gateway)
    body = _chat(_fresh("sampled"), temperature=0.9)
    assert all("x-pagedserve-cache" not in _post(client, body).headers for _ in range(2))
    seeded = {**body, "seed": 11}
    assert [_post(client, seeded).headers["x-pagedserve-cache"] for _ in range(2)] == \
        ["miss", "hit"]


def test_a_client_that_leaves_mid_stream_leaves_nothing_cached(gateway, client):
    body = _chat(_fresh("left"), max_tokens=64, ignore_eos=True, stream=True)
    with client.stream("POST", "/v1/chat/completions", headers=TEAM_A, json=body) as reply:
        request_id = reply.headers["x-request-id"]
        lines = reply.iter_lines()
        for _ in range(3):
            next(lines)
    if gateway.mode == HAPROXY:
        # The disconnect reaches the model replica: its generate call for the request is
        # cancelled (which aborts the sequence in the engine) long before 64 tokens are out.
        # Not asserted behind Serve's proxy: there, in 1 of 36 leaves observed, the proxy
        # logged the cancel and neither the ingress nor the replica ever logged the request
        # (cause not found; every other time the call was cancelled within 0.4 s).
        assert any("Replica" in line and "CANCELLED" in line
                   for line in _wait_for_log_lines(gateway, request_id, "CANCELLED"))
    unary = {k: v for k, v in body.items() if k != "stream"}
    assert _post(client, unary).headers["x-pagedserve-cache"] == "miss"


def _wait_for_log_lines(gateway: Served, request_id: str, word: str,
                        timeout_s: float = 20) -> list[str]:
    """The Serve log lines of `request_id`, once one of them holds `word` (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = request_log_lines(gateway.logs, request_id)
        if any(word in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def test_redis_stopped_then_started_again(gateway, client):
    _behind_serve_proxy_only(gateway)
    redis = gateway.redis
    errors_before = _metric(client, "pagedserve_response_cache_errors_total", level="l2")
    redis.stop()
    try:
        for i in range(10):  # misses, served
            assert _post(client, _chat(_fresh(f"down {i}"))).headers["x-pagedserve-cache"] \
                == "miss"
        assert _metric(client, "pagedserve_response_cache_errors_total", level="l2") \
            > errors_before
    finally:
        redis.start()
    time.sleep(1.5)  # past the ingresses' pause after a Redis error
    body = _chat(_fresh("back"))
    _post(client, body)
    levels = {_post(client, body).headers.get("x-pagedserve-cache-level") for _ in range(30)}
    assert "l2" in levels  # stored in Redis again and found there by the other replica


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("GET", "/metrics"),
])
def test_every_route_needs_a_known_key(client, method, path):
    body = _chat("Hi") if path == "/v1/chat/completions" else {"model": MODEL, "prompt": "Hi",
                                                                  "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer sk-wrong-key-1"},
                    {"Authorization": "sk-team-a-change-me"}):
        reply = client.request(method, path, headers=headers,
                               json=body if method == "POST" else None)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.json()["error"]["type"] == "authentication_error"
    right = client.request(method, path, headers=TEAM_A, json=body if method == "POST" else None)
    assert right.status_code == 200, right.text


def test_probes_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_unknown_routes_and_large_bodies_get_openai_errors(client):
    """The proxy in front passes every path to the app and keeps the body's declared length."""
    missing = client.get("/v1/nothing-here", headers=TEAM_A)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == \
        "invalid_request_error"
    too_large = client.post("/v1/chat/completions", content=b" " * (2 << 20),
                            headers={**TEAM_A, "content-type": "application/json"})
    assert too_large.status_code == 413, too_large.text
    assert "exceeds" in too_large.json()["error"]["message"]


def test_a_key_over_its_limit_gets_429_across_both_ingresses(gateway, client):
    statuses, retry_after, request_ids = [], [], []
    for _ in range(3 * TIGHT_LIMIT):
        reply = client.get("/v1/models", headers=TIGHT)
        statuses.append(reply.status_code)
        request_ids.append(reply.headers["x-request-id"])
        if reply.status_code == 429:
            assert reply.json()["error"]["type"] == "rate_limit_error"
            retry_after.append(int(reply.headers["Retry-After"]))
    # One budget in Redis for both ingress replicas; at most one more request refills while
    # these run. Buckets of their own would have admitted up to TIGHT_LIMIT at each replica.
    assert TIGHT_LIMIT <= statuses.count(200) <= TIGHT_LIMIT + 1, statuses
    assert set(statuses) == {200, 429} and all(r >= 1 for r in retry_after)
    served_by = ingress_replicas_of(gateway.logs, request_ids)  # request id -> replica
    per_replica = Counter(served_by.values())
    alone = sum(min(n, TIGHT_LIMIT) for n in per_replica.values())
    assert len(served_by) == len(request_ids) and alone > TIGHT_LIMIT + 1, per_replica
    assert _metric(client, "pagedserve_auth_rejections_total", key_name="tight", code="429") > 0


def test_haproxy_fronts_both_ingress_replicas(gateway):
    """HAProxy mode is on: HAProxy's backend for the app lists both ingress replicas' own
    ports, both up, and Serve's proxy on the head node only as a backup."""
    if gateway.mode != HAPROXY:
        pytest.skip("HAProxy mode only")
    stats = httpx.get(f"http://127.0.0.1:{gateway.env['RAY_SERVE_HAPROXY_STATS_PORT']}"
                      "/stats;csv", timeout=10).text.removeprefix("# ")
    servers = {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(stats))
               if row["pxname"] == "http-pagedserve"
               and row["svname"] not in ("FRONTEND", "BACKEND")}
    ingress = [name for name in servers if "Ingress" in name]
    backups = [name for name in servers if name.startswith("SERVE_PROXY_ACTOR")]
    assert len(ingress) == 2 and all(servers[name] == "UP" for name in ingress), servers
    assert len(backups) == 1, servers


def test_no_tracebacks_in_the_serve_logs(gateway):
    assert serve_tracebacks(gateway.logs) == []
