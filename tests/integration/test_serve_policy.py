"""`router.policy: serve`: requests reach the replicas through Serve's default request router,
never through our router's admission, and still stream; errors are still OpenAI-shaped.

The app is deployed next to the `local.yaml` one, on the same cluster, from this driver.
"""

import json
import time

import httpx
import pytest

from pagedserve.cluster.app import build_app

MODEL = "SmolLM2-135M-Instruct"
APP, PREFIX = "serve-policy", "/serve-policy"
ARGS = {"num_replicas": 1, "replica_num_cpus": 0.5, "torch_threads": 1,
        "engine": {"device": "cpu", "max_num_seqs": 4, "cpu_kv_cache_gib": 0.25},
        "router": {"policy": "serve"}}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app(ray_driver):
    from ray import serve

    serve.run(build_app(ARGS), name=APP, route_prefix=PREFIX)
    router = serve.get_deployment_handle("Router", app_name=APP)
    deadline = time.monotonic() + 120
    while router.num_ready_replicas.remote().result() < 1:  # replicas still report to it
        assert time.monotonic() < deadline, "the replica did not report to the router"
        time.sleep(0.5)
    yield router
    serve.delete(APP)


def _replicas(router) -> dict:
    return router.stats.remote().result()["replicas"]


def _events(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_request_streams_without_our_admission(server, app):
    router = app
    looked_up = sum(r["prefix_queried_tokens"] for r in _replicas(router).values())
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}{PREFIX}/v1/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        events = _events(response)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] == 6
    deadline = time.monotonic() + 10
    while sum(r["prefix_queried_tokens"] for r in _replicas(router).values()) == looked_up:
        assert time.monotonic() < deadline, "the replica never reported running the prompt"
        time.sleep(0.2)
    assert all(r["num_admitted"] == 0 for r in _replicas(router).values())


def test_errors_are_still_openai_shaped(server, app):
    response = httpx.post(f"{server}{PREFIX}/v1/completions",
                          json={"model": MODEL, "prompt": "x", "max_tokens": -1}, timeout=30)
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
