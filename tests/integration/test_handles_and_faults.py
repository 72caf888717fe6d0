"""Handle calls from another driver, bad input over HTTP, and a client leaving mid-stream."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_cli import ENV, REPO
from serve_logs import logs_dir, serve_tracebacks
from transformers import AutoTokenizer

from pagedserve.replicas.models.default_model import default_model_dir

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

pytestmark = pytest.mark.integration


def test_second_driver_calls_the_app_through_its_handle(server):
    script = Path(__file__).with_name("handle_client.py")
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    unary_text = result["unary"]["choices"][0]["message"]["content"]
    assert "Paris" in unary_text
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in result["chunks"] if c["choices"])
    assert streamed == unary_text
    assert result["chunks"][0]["object"] == "chat.completion.chunk"
    assert result["completion"]["object"] == "text_completion"


BAD_INPUTS = [
    ("unknown model", {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("negative temperature", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("top_p above 1", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("max_tokens below 1", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("n of zero", {**GOOD, "n": 0}, 400, "n"),
    ("no messages", {**GOOD, "messages": []}, 400, "messages"),
    ("bad role", {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("wrong type", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ("over the context", {**GOOD, "max_tokens": 100_000}, 400, "max_tokens"),
    ("logprobs too high", {**GOOD, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("usage without stream", {**GOOD, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("logit_bias outside the vocabulary", {**GOOD, "logit_bias": {"99999999": 5}}, 400,
     "logit_bias"),
    ("logit_bias not a token id", {**GOOD, "logit_bias": {"hello": 5}}, 400, "logit_bias"),
    ("logit_bias above 100", {**GOOD, "logit_bias": {"42": 101}}, 400, "logit_bias"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_chat_input_gets_an_openai_error(server, name, body, status, param):
    response = httpx.post(f"{server}{CHAT}", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


def test_logit_bias_forces_and_bans_tokens(server):
    greedy = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3,
              "temperature": 0}

    def tokens(**extra) -> list[str]:
        response = httpx.post(f"{server}/v1/completions", json={**greedy, **extra,
                                                                "logprobs": 0}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]["tokens"]

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(progress=False))
    plain = tokens()
    forced = tokens(logit_bias={"42": 100})
    assert forced == [tokenizer.decode([42])] * 3
    # ban every token of the plain answer: its first token changes
    banned = {i for t in plain for i in tokenizer.encode(t, add_special_tokens=False)}
    assert tokens(logit_bias={str(i): -100 for i in banned})[0] != plain[0]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": [-5]}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": [10**9]}).encode(), 400),
    # once 500s: a lone surrogate in a prompt or a model name, hostile nesting
    (b'{"model": "' + MODEL.encode() + b'", "prompt": "a\\udc00b"}', 400),
    (b'{"model": "\\ud800", "prompt": "Hi"}', 400),
    (b'{"model": "m", "prompt": "Hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
    (b'{"model": "m", "prompt": ' + b"[" * 3_000 + b"1" + b"]" * 3_000 + b"}", 400),
])
def test_bad_completion_bodies(server, body, status):
    response = httpx.post(f"{server}/v1/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_vllms_tokenizer_routes(server):
    answer = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "Hello"},
                        timeout=10).json()
    assert answer["count"] == len(answer["tokens"]) > 0
    back = httpx.post(f"{server}/detokenize", json={"tokens": answer["tokens"]}, timeout=10)
    assert back.json() == {"prompt": "Hello"}
    unknown = httpx.post(f"{server}/tokenize", json={"model": "gpt-9", "prompt": "x"}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_vllms_health_route_answers_200(server):
    response = httpx.get(f"{server}/health", timeout=10)
    assert response.status_code == 200 and response.content == b""


def test_oversized_body_is_413_and_unknown_route_is_openai_shaped(server):
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = httpx.post(f"{server}{CHAT}", json=huge, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(f"{server}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_health_ready_and_metrics(server):
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{server}/readyz", timeout=10).json()["ready"] is True
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    for name in ("pagedserve_ttft_s_bucket", "pagedserve_router_queue_len",
                 "pagedserve_replica_free_blocks", "pagedserve_requests_total"):
        assert name in metrics


def _requests_by_status(server: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pagedserve_requests_total":
                status = sample.labels["status"]
                counts[status] = counts.get(status, 0.0) + sample.value
    return counts


def test_metrics_count_a_413_a_404_and_a_400_after_they_happen(server):
    before = _requests_by_status(server)
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert httpx.post(f"{server}{CHAT}", json=huge, timeout=60).status_code == 413
    assert httpx.get(f"{server}/v1/nothing", timeout=10).status_code == 404
    assert httpx.get(f"{server}/v1/models/gpt-9", timeout=10).status_code == 404
    assert httpx.post(f"{server}{CHAT}", json={**GOOD, "n": 0}, timeout=60).status_code == 400
    assert httpx.post(f"{server}{CHAT}", content=b"{no", timeout=60).status_code == 400
    after = _requests_by_status(server)
    rose = {s: after.get(s, 0.0) - before.get(s, 0.0) for s in ("413", "404", "400")}
    assert rose == {"413": 1.0, "404": 2.0, "400": 2.0}, (before, after)


def test_replica_keeps_serving_after_bad_input(server):
    for body, _, _, _ in [(b[1], None, None, None) for b in BAD_INPUTS]:
        httpx.post(f"{server}{CHAT}", json=body, timeout=60)
    ok = httpx.post(f"{server}{CHAT}", json=GOOD, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def _replica_stats(ray_driver) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Replica", app_name="pagedserve").stats.remote().result()


def test_client_leaving_mid_stream_frees_its_blocks(server, ray_driver):
    body = {**GOOD, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}{CHAT}", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False) if line]
        assert received
        during = _replica_stats(ray_driver)
        assert during["num_running"] == 1
    deadline = time.monotonic() + 30
    stats = _replica_stats(ray_driver)
    while time.monotonic() < deadline and (stats["num_running"] or stats["num_waiting"]):
        time.sleep(0.5)
        stats = _replica_stats(ray_driver)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    # Serve's proxy cancels its side when a client leaves: a disconnect, logged as no error.
    assert [t for t in serve_tracebacks(logs_dir()) if "TaskCancelledError" in t] == []
