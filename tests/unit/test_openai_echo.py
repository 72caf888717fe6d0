"""Completions `echo` and vLLM's `prompt_logprobs` in the ingress, on the real OpenAI service and
gateway with a scripted dispatcher (no Ray): texts, logprobs shapes, streams, max_tokens 0,
and response-cache keys."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from tiny_models import tiny_tokenizer

from pagedserve.cluster.gateway import Gateway
from pagedserve.cluster.metrics import IngressMetrics
from pagedserve.cluster.service import ModelInfo, OpenAIService
from pagedserve.config import ClusterConfig
from pagedserve.outputs import CompletionOutput, RequestOutput

PROMPT = "w3 w4 w7"  # token ids 3, 4, 7 with the tiny word-level tokenizer
PROMPT_IDS = [3, 4, 7]


def lp(token_id: int, *alternatives: int) -> dict[int, float]:
    """A logprobs dict: the token at -0.5, alternatives at -1, -2, ..."""
    return {token_id: -0.5, **{a: -1.0 - i for i, a in enumerate(alternatives)}}


class ScriptedEngine:
    """Per job as the engine sends it: the prompt logprobs (when asked) in the first delta,
    which carries completion 0's first token; the other completions and the rest come after."""

    def __init__(self) -> None:
        self.calls = 0

    async def stream(self, job):
        self.calls += 1
        p = job.params
        scored = None
        if p.prompt_logprobs is not None:
            scored = [None] + [lp(t, 8, 9) for t in job.prompt_token_ids[1:]]
        steps = [(i, 0) for i in range(p.n)] + [(i, 1) for i in range(p.n)]
        for k, (index, step) in enumerate(steps):
            last = k == len(steps) - 1
            out = self._output(index, step, p.max_tokens, p.logprobs)
            yield RequestOutput(job.request_id, None, [], [out] if out else [], finished=last,
                                prompt_logprobs=scored if k == 0 else None)
            await asyncio.sleep(0)

    @staticmethod
    def _output(index: int, step: int, max_tokens: int, logprobs) -> CompletionOutput | None:
        if max_tokens == 0:  # nothing generated: each completion only finishes
            return CompletionOutput(index, "", [], None, None, "length") if step else None
        token = 5 + step
        return CompletionOutput(index, f" w{token}", [token], None,
                                [lp(token, 10)] if logprobs is not None else None,
                                "length" if step else None)


def _service():
    engine = ScriptedEngine()
    model = ModelInfo("m", tiny_tokenizer(), 256, 512)
    return OpenAIService(ClusterConfig(), model, engine, IngressMetrics()), engine


def _body(**fields) -> dict:
    return {"model": "m", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, **fields}


async def _drain(result):
    return result if isinstance(result, dict) else [chunk async for chunk in result]


def _complete(body, service=None):
    service = service or _service()[0]
    return asyncio.run(_drain_completion(service, body))


async def _drain_completion(service, body):
    return await _drain(await service.completions(body))


def test_echo_puts_the_prompt_and_its_logprobs_first():
    openai = pytest.importorskip("openai")
    openai.types.Completion.model_validate(_complete(_body(echo=True)))
    # (the SDK's types say a number where OpenAI sends null for an echoed first token; the
    # SDK builds responses without validating them)
    response = _complete(_body(echo=True, logprobs=1, n=2))
    for choice in response["choices"]:
        assert choice["text"] == PROMPT + " w5 w6"
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == ["w3", "w4", "w7", "w5", "w6"]
        assert logprobs["token_logprobs"] == [None, -0.5, -0.5, -0.5, -0.5]
        assert logprobs["top_logprobs"][0] is None
        assert logprobs["top_logprobs"][1] == {"w4": -0.5}  # the token is the best here
        # prompt tokens' offsets add up their texts; generated text follows the prompt's
        assert logprobs["text_offset"] == [0, 2, 4, len(PROMPT), len(PROMPT) + 3]
        assert "prompt_logprobs" not in choice
    assert response["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_echo_stream_opens_each_choice_with_the_prompt():
    body = _body(echo=True, logprobs=1, n=2, prompt=[PROMPT, "w11"])
    unary = _complete(body)
    chunks = _complete({**body, "stream": True})
    for choice in unary["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        prompt = PROMPT if choice["index"] < 2 else "w11"
        assert mine[0]["text"] == prompt and mine[0]["logprobs"]["token_logprobs"][0] is None
        assert "".join(c["text"] for c in mine) == choice["text"]
        streamed = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert streamed == choice["logprobs"]["tokens"]


def test_echo_with_max_tokens_0_returns_the_prompt_alone():
    response = _complete(_body(echo=True, logprobs=0, max_tokens=0))
    (choice,) = response["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["w3", "w4", "w7"]
    assert response["usage"]["completion_tokens"] == 0
    plain = _complete(_body(echo=True, max_tokens=0, prompt=PROMPT_IDS))  # token ids decoded
    assert plain["choices"][0]["text"] == PROMPT and plain["choices"][0]["logprobs"] is None


def test_prompt_logprobs_field_is_vllms_list():
    response = _complete(_body(prompt_logprobs=1))
    (choice,) = response["choices"]
    assert choice["text"] == " w5 w6" and choice["logprobs"] is None
    first, second = choice["prompt_logprobs"][:2]
    assert first is None
    assert second == {"4": {"logprob": -0.5, "rank": 1, "decoded_token": "w4"}}
    assert len(choice["prompt_logprobs"]) == len(PROMPT_IDS)


def test_prompt_logprobs_rank_of_a_token_outside_the_top():
    from pagedserve.cluster.openai_logprobs import TokenTexts, vllm_prompt_logprobs

    got = vllm_prompt_logprobs([3, 4], [None, {4: -3.0, 8: -0.1, 9: -0.2}],
                               TokenTexts(tiny_tokenizer()), top_n=2)
    assert got[1] == {"4": {"logprob": -3.0, "rank": None, "decoded_token": "w4"},
                      "8": {"logprob": -0.1, "rank": 1, "decoded_token": "w8"},
                      "9": {"logprob": -0.2, "rank": 2, "decoded_token": "w9"}}


def test_echo_and_prompt_logprobs_are_part_of_the_cache_key():
    config = ClusterConfig(cache={"enabled": True})
    service, engine = _service()
    gateway = Gateway(config, service, "m@test", CollectorRegistry())

    def ask(**fields):
        async def run():
            answer = await gateway.answer("completions", _body(**fields), None)
            return answer.cache, await _drain(answer.result)
        return asyncio.run(run())

    variants = [{}, {"echo": True}, {"echo": True, "logprobs": 1}, {"logprobs": 1},
                {"echo": True, "logprobs": 1, "prompt_logprobs": 1}, {"prompt_logprobs": 1}]
    for fields in variants:
        assert ask(**fields)[0] == "miss"
    assert engine.calls == len(variants)
    status, chunks = ask(echo=True, stream=True)
    assert status == "hit" and "".join(c["choices"][0]["text"] for c in chunks) == (
        PROMPT + " w5 w6")
