"""The gateway's answer path on the real OpenAI service with a scripted dispatcher (no Ray):
what is cached and what never is, hits that skip generation, scopes, and token settlement."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pagedserve.cluster.gateway import Gateway
from pagedserve.cluster.metrics import IngressMetrics
from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.service import ModelInfo, OpenAIService
from pagedserve.config import ClusterConfig
from pagedserve.outputs import CompletionOutput, RequestOutput

KEYS = [{"name": "alice", "key": "sk-alice-1234"}, {"name": "bob", "key": "sk-bob-12345"}]


class ScriptedDispatcher:
    """Each job streams `tokens` one-token deltas; `fail_after` raises after that many;
    `finish` is the last delta's finish reason."""

    def __init__(self) -> None:
        self.calls = 0
        self.tokens = 4
        self.fail_after: int | None = None
        self.finish = "length"

    async def stream(self, job):
        self.calls += 1
        for i in range(self.tokens):
            if self.fail_after is not None and i == self.fail_after:
                raise APIError.overloaded(retry_after=1)
            last = i == self.tokens - 1
            out = CompletionOutput(index=0, text=f"t{i} ", token_ids=[10 + i],
                                   finish_reason=self.finish if last else None)
            yield RequestOutput(job.request_id, None, job.prompt_token_ids, [out], finished=last)
            await asyncio.sleep(0)


def _gateway(scope: str = "key", tokens_per_min: float | None = None):
    config = ClusterConfig(cache={"enabled": True, "scope": scope},
                           auth={"api_keys": KEYS,
                                 "rate_limit": {"tokens_per_min": tokens_per_min}})
    dispatcher = ScriptedDispatcher()
    service = OpenAIService(config, ModelInfo("m", None, 256, 1000), dispatcher,
                            IngressMetrics())
    return Gateway(config, service, "m@test", CollectorRegistry()), dispatcher


def _body(**fields) -> dict:
    return {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, **fields}


async def _drain(result) -> list[dict]:
    return result if isinstance(result, dict) else [chunk async for chunk in result]


def _ask(gateway, body, key_name="alice"):
    key = next(k for k in gateway.keys.keys if k.name == key_name)

    async def run():
        answer = await gateway.answer("completions", body, key)
        return answer.cache, await _drain(answer.result)

    return asyncio.run(run())


def test_a_hit_skips_generation_and_streams_share_entries():
    gateway, dispatcher = _gateway()
    status, first = _ask(gateway, _body())
    assert status == "miss" and dispatcher.calls == 1
    status, again = _ask(gateway, _body())
    assert status == "hit" and dispatcher.calls == 1
    assert again["choices"] == first["choices"] and again["id"] != first["id"]
    status, chunks = _ask(gateway, _body(stream=True))
    assert status == "hit" and "".join(c["choices"][0]["text"] for c in chunks) == "t0 t1 t2 t3 "


def test_scope_key_keeps_tenants_apart_and_global_shares():
    gateway, _ = _gateway("key")
    _ask(gateway, _body(), "alice")
    assert _ask(gateway, _body(), "bob")[0] == "miss"
    shared, _ = _gateway("global")
    _ask(shared, _body(), "alice")
    assert _ask(shared, _body(), "bob")[0] == "hit"


@pytest.mark.parametrize("stream", [False, True])
def test_errors_are_never_cached(stream):
    gateway, dispatcher = _gateway()
    dispatcher.fail_after = 2  # after some output: a stream has already sent chunks
    with pytest.raises(APIError):
        _ask(gateway, _body(stream=stream))
    dispatcher.fail_after = None
    assert _ask(gateway, _body(stream=stream))[0] == "miss"
    assert dispatcher.calls == 2


def test_aborted_requests_are_never_cached():
    gateway, dispatcher = _gateway()
    dispatcher.finish = "abort"
    _ask(gateway, _body())
    _ask(gateway, _body(stream=True))
    assert _ask(gateway, _body())[0] == "miss" and dispatcher.calls == 3


def test_a_stream_the_client_leaves_stores_nothing():
    gateway, dispatcher = _gateway()
    key = gateway.keys.keys[0]

    async def leave():
        answer = await gateway.answer("completions", _body(stream=True), key)
        chunks = answer.result
        await anext(chunks)
        await chunks.aclose()

    asyncio.run(leave())
    assert _ask(gateway, _body())[0] == "miss" and dispatcher.calls == 2


def test_sampled_requests_are_not_cached():
    gateway, dispatcher = _gateway()
    statuses = [_ask(gateway, _body(temperature=0.7))[0] for _ in range(2)]
    assert statuses == [None, None] and dispatcher.calls == 2
    assert [_ask(gateway, _body(temperature=0.7, seed=3))[0] for _ in range(2)] == \
        ["miss", "hit"]


def test_tokens_are_reserved_then_settled_with_the_real_count():
    gateway, dispatcher = _gateway(tokens_per_min=40)
    dispatcher.tokens = 1  # each uses 3 + 1 of the 3 + 8 it reserves
    for i in range(8):  # 32 used, 8 left; without giving back 7 each, the 4th would be refused
        _ask(gateway, _body(prompt=[1, 2, i + 3], max_tokens=8))
    with pytest.raises(APIError) as err:
        _ask(gateway, _body(prompt=[9, 9, 9], max_tokens=8))
    assert err.value.status == 429 and err.value.retry_after > 0
    assert _ask(gateway, _body(prompt=[1, 2, 3], max_tokens=8))[0] == "hit"  # hits cost none
