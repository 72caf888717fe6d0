"""The OpenAI protocol layer: request validation, sampling mapping, prompts, responses, SSE."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from tiny_models import tiny_tokenizer

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_prompts import chat_messages, completion_prompts, render_chat
from pagedserve.cluster.openai_requests import parse_chat_request, parse_completion_request
from pagedserve.cluster.openai_responses import (
    ChatResponseBuilder,
    CompletionResponseBuilder,
    models_list,
)
from pagedserve.cluster.openai_sampling import to_sampling_params
from pagedserve.cluster.openai_sse import SSE_DONE, sse_error, sse_event
from pagedserve.cluster.openai_streams import ChatStream, CompletionStream
from pagedserve.outputs import CompletionOutput, RequestOutput

HI = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> dict:
    return {"model": "m", "messages": HI, **fields}


def completion(**fields) -> dict:
    return {"model": "m", "prompt": "w3 w4", **fields}


def bad_request(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


@pytest.mark.parametrize("body, param", [
    (chat(temperature="0.5"), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-1), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(n=0), "n"),
    (chat(n=True), "n"),
    (chat(n=1.5), "n"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(seed="1"), "seed"),
    (chat(stop=5), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(stop=[f"s{i}" for i in range(17)]), "stop"),
    (chat(logprobs=1), "logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(stop_token_ids=[1, -2]), "stop_token_ids[1]"),
    (chat(ignore_eos=1), "ignore_eos"),
    (chat(top_k=-2), "top_k"),
    (chat(logit_bias={"five": 1.0}), "logit_bias"),
    (chat(logit_bias={"-5": 1.0}), "logit_bias"),
    (chat(logit_bias={"5": 100.5}), "logit_bias"),
    (chat(logit_bias={"5": "1"}), "logit_bias"),
    (chat(logit_bias=[5]), "logit_bias"),
    (chat(logit_bias={str(i): 1.0 for i in range(1025)}), "logit_bias"),
    (chat(tools=[{"type": "function"}]), "tools[0].function"),
    (chat(echo=True), "echo"),
    (chat(prompt_logprobs=1), "prompt_logprobs"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(response_format={"type": "json_schema"}), "response_format"),
    (chat(guided_regex="a", guided_choice=["a"]), "guided_choice"),
    (chat(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex"),
    ({"model": "m"}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="Hi"), "messages"),
    (chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[HI[0], {"role": "user"}]), "messages[1]"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content"),
])
def test_bad_chat_requests_are_400_naming_the_param(body, param):
    assert bad_request(parse_chat_request, body).param == param


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "prompt"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[[]]), "prompt"),
    (completion(prompt=[3, -1]), "prompt"),
    (completion(prompt=[[3], [4, -5]]), "prompt"),
    (completion(prompt=[3, True]), "prompt"),
    (completion(prompt=["a", 3]), "prompt"),
    (completion(prompt=5), "prompt"),
    (completion(logprobs=21), "logprobs"),
    (completion(logprobs=True), "logprobs"),
    (completion(echo="yes"), "echo"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(max_tokens=-1, echo=True), "max_tokens"),
    (completion(prompt_logprobs=21), "prompt_logprobs"),
    (completion(prompt_logprobs=-1), "prompt_logprobs"),
    (completion(prompt_logprobs=1, stream=True), "prompt_logprobs"),
    (completion(best_of=3), "best_of"),
    (completion(suffix="x"), "suffix"),
    (completion(stream_options={"include_usage": True}), "stream_options"),
])
def test_bad_completion_requests_are_400_naming_the_param(body, param):
    assert bad_request(parse_completion_request, body).param == param


@pytest.mark.parametrize("body", [[1, 2], "not json", b"[1]", None])
def test_a_body_that_is_not_a_json_object_is_400(body):
    assert bad_request(parse_chat_request, body).param is None


def test_error_messages_say_what_is_wrong():
    err = bad_request(parse_chat_request, chat(temperature=2.5))
    assert "less than or equal to 2" in err.message and "2.5" in err.message
    err = bad_request(parse_chat_request, {"model": "m"})
    assert err.message == "Missing required parameter: 'messages'."
    err = bad_request(parse_chat_request, chat(messages=[{"role": "user", "content": [
        {"type": "image_url"}]}]))
    assert "image_url" in err.message and "text" in err.message


def test_valid_requests_parse_and_unknown_fields_are_ignored():
    request = parse_chat_request(json.dumps(chat(
        stop="END", stream=True, stream_options={"include_usage": True}, store=False,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None}])))
    assert request.stop == ["END"] and request.include_usage
    assert chat_messages(request) == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "a\nb"},
                                      {"role": "assistant", "content": ""}]
    assert not parse_chat_request(chat(stream=False)).include_usage
    assert parse_completion_request(completion(best_of=1, echo=False)).prompt == ["w3 w4"]


@pytest.mark.parametrize("prompt, expected", [
    ("w3 w4", ["w3 w4"]),
    (["a", "b"], ["a", "b"]),
    ([5, 6, 0], [[5, 6, 0]]),
    ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_completion_prompt_shapes(prompt, expected):
    assert completion_prompts(parse_completion_request(completion(prompt=prompt))) == expected


def test_sampling_params_map_every_field():
    request = parse_chat_request(chat(
        n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, max_tokens=20, min_tokens=2,
        stop=["x", "y"], stop_token_ids=[7], ignore_eos=True, seed=3, logprobs=True,
        top_logprobs=4, logit_bias={"5": -100, "9": 2.5}))
    params = to_sampling_params(request, max_model_len=100, prompt_len=10)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        2, 0.7, 0.9, 5, 0.1)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.5, -0.5, 1.1)
    assert (params.max_tokens, params.min_tokens, params.stop, params.stop_token_ids) == (
        20, 2, ["x", "y"], [7])
    assert (params.ignore_eos, params.seed, params.logprobs) == (True, 3, 4)
    assert params.logit_bias == {5: -100.0, 9: 2.5}


def test_sampling_defaults_follow_openai_and_vllm():
    params = to_sampling_params(parse_chat_request(chat()), max_model_len=100, prompt_len=30)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1
    assert params.max_tokens == 70 and params.logprobs is None and params.stop == []
    chat_lp = to_sampling_params(parse_chat_request(chat(logprobs=True)), 100, 30)
    assert chat_lp.logprobs == 0
    comp = to_sampling_params(parse_completion_request(completion(logprobs=3)), 100, 30)
    assert comp.logprobs == 3
    assert comp.max_tokens == 16  # completions without max_tokens: OpenAI's default
    assert to_sampling_params(parse_completion_request(completion()), 100, 90).max_tokens == 10
    assert comp.prompt_logprobs is None


@pytest.mark.parametrize("fields, expected", [
    (dict(echo=True), None),
    (dict(echo=True, logprobs=2), 2),
    (dict(logprobs=2), None),
    (dict(prompt_logprobs=0), 0),
    (dict(echo=True, logprobs=1, prompt_logprobs=3), 3),
    (dict(echo=True, logprobs=4, prompt_logprobs=3), 4),
])
def test_echo_with_logprobs_and_prompt_logprobs_ask_the_engine(fields, expected):
    params = to_sampling_params(parse_completion_request(completion(**fields)), 100, 10)
    assert params.prompt_logprobs == expected


def test_echo_allows_max_tokens_0():
    request = parse_completion_request(completion(echo=True, max_tokens=0, stream=True))
    assert to_sampling_params(request, 100, 10).max_tokens == 0


def test_max_completion_tokens_wins_over_max_tokens():
    request = parse_chat_request(chat(max_tokens=5, max_completion_tokens=9))
    assert to_sampling_params(request, 100, 10).max_tokens == 9


@pytest.mark.parametrize("body, param", [
    (chat(max_tokens=91), "max_tokens"),
    (chat(max_tokens=5, max_completion_tokens=91), "max_completion_tokens"),
])
def test_too_many_tokens_for_the_context_is_400(body, param):
    err = bad_request(to_sampling_params, parse_chat_request(body), 100, 10)
    assert err.param == param
    assert "maximum context length is 100 tokens" in err.message and "101 tokens" in err.message


@pytest.mark.parametrize("parse, body, param", [
    (parse_chat_request, chat(), "messages"),
    (parse_completion_request, completion(), "prompt"),
])
def test_a_prompt_that_fills_the_context_is_400(parse, body, param):
    err = bad_request(to_sampling_params, parse(body), 100, 100)
    assert err.param == param and "100 tokens" in err.message


def test_sampling_params_errors_name_the_request_field():
    err = bad_request(to_sampling_params, parse_chat_request(chat(min_tokens=50, max_tokens=10)),
                      100, 10)
    assert err.param == "min_tokens" and "SamplingParams" not in err.message


def test_render_chat_applies_the_model_template(default_model_dir):
    from pagedserve.replicas.models.registry import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    request = parse_chat_request(chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]))
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=False)
    ids = render_chat(request, tokenizer)
    assert all(type(t) is int for t in ids)
    assert ids == tokenizer.encode(text, add_special_tokens=False)


def test_render_chat_without_a_template_is_400():
    err = bad_request(render_chat, parse_chat_request(chat()), tiny_tokenizer())
    assert err.param == "messages" and "chat template" in err.message


# ---- responses -------------------------------------------------------------------------------

TOKENIZER = tiny_tokenizer()


def delta(*outputs: CompletionOutput, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1, 3, 4], list(outputs), finished)


def out(index=0, text="", token_ids=(), logprobs=None, finish_reason=None, stop_reason=None):
    return CompletionOutput(index, text, list(token_ids), None, logprobs, finish_reason,
                            stop_reason)


def lp(token_id: int, *alternatives: int) -> dict[int, float]:
    """A logprobs dict: the sampled token at -0.5, alternatives at -1, -2, ..."""
    return {token_id: -0.5, **{a: -1.0 - i for i, a in enumerate(alternatives)}}


SCRIPT = [  # two choices interleaved; a held-back token; a stop and an abort
    delta(out(0, " w5", [5], [lp(5, 6, 7)]), out(1, " w9", [9], [lp(9, 5, 6)])),
    delta(out(0, "", [10], [lp(10, 11, 12)])),
    delta(out(0, " w10 w11", [11], [lp(11, 10, 5)], "stop", "w12")),
    delta(out(1, " w3", [3], [lp(3, 4, 5)], "abort"), finished=True),
]


def chat_chunks(script, **kwargs) -> list[dict]:
    stream = ChatStream("r", "m", 123, tokenizer=TOKENIZER, **kwargs)
    chunks = [c for d in script for c in stream.on_delta(d)]
    return chunks + stream.finish(prompt_tokens=3)


def test_chat_chunks_concatenate_to_the_unary_response():
    openai = pytest.importorskip("openai")
    chunks = chat_chunks(SCRIPT, top_logprobs=2)
    builder = ChatResponseBuilder("r", "m", 123, tokenizer=TOKENIZER, top_logprobs=2)
    for d in SCRIPT:
        builder.add(d)
    response = builder.response(prompt_tokens=3)
    openai.types.chat.ChatCompletion.model_validate(response)
    for chunk in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    for index, text, reason in [(0, " w5 w10 w11", "stop"), (1, " w9 w3", "length")]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == text
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == reason and mine[-1]["delta"] == {}
        choice = response["choices"][index]
        assert choice["message"] == {"role": "assistant", "content": text}
        assert choice["finish_reason"] == reason
        streamed = [e for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert streamed == choice["logprobs"]["content"]
    assert response["id"] == "chatcmpl-r" and response["object"] == "chat.completion"
    assert response["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert response["choices"][0]["stop_reason"] == "w12"


def test_chat_logprobs_shape():
    chunks = chat_chunks(SCRIPT, top_logprobs=2)
    entries = [e for c in chunks if c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"] if c["choices"][0]["index"] == 0]
    assert [e["token"] for e in entries] == ["w5", "w10", "w11"]  # the held-back token too
    first = entries[0]
    assert first["logprob"] == -0.5 and first["bytes"] == list(b"w5")
    assert [(t["token"], t["logprob"]) for t in first["top_logprobs"]] == [
        ("w5", -0.5), ("w6", -1.0)]


def test_chat_without_logprobs_sends_no_empty_chunks():
    chunks = chat_chunks(SCRIPT)
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert contents.count("") == 2  # only the two opening chunks carry empty content
    assert all("usage" not in c for c in chunks)


def test_include_usage_adds_null_usage_and_a_last_usage_chunk():
    openai = pytest.importorskip("openai")
    chunks = chat_chunks(SCRIPT, include_usage=True)
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                   "total_tokens": 8}
    openai.types.chat.ChatCompletionChunk.model_validate(chunks[-1])


def test_completion_chunks_concatenate_with_choice_offsets():
    openai = pytest.importorskip("openai")
    stream = CompletionStream("r", "m", 123, tokenizer=TOKENIZER, logprobs=1,
                              include_usage=True)
    builder = CompletionResponseBuilder("r", "m", 123, tokenizer=TOKENIZER, logprobs=1)
    chunks = []
    for prompt_index in range(2):  # two prompts, n=2: choices 0, 1, 2, 3
        for d in SCRIPT:
            chunks += stream.on_delta(d, choice_offset=prompt_index * 2)
            builder.add(d, choice_offset=prompt_index * 2)
    chunks += stream.finish(prompt_tokens=6)
    response = builder.response(prompt_tokens=6)
    openai.types.Completion.model_validate(response)
    for chunk in chunks:  # the SDK's type has no null finish_reason; streams send null mid-way
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        openai.types.Completion.model_validate({**chunk, "choices": choices})
    assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]
    for choice in response["choices"]:
        streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1]
                           if c["choices"][0]["index"] == choice["index"])
        assert streamed == choice["text"]
    assert response["choices"][2]["text"] == " w5 w10 w11"
    assert response["usage"] == chunks[-1]["usage"] == {
        "prompt_tokens": 6, "completion_tokens": 10, "total_tokens": 16}


def test_completion_logprobs_shape():
    builder = CompletionResponseBuilder("r", "m", 1, tokenizer=TOKENIZER, logprobs=2)
    for d in SCRIPT:
        builder.add(d)
    logprobs = builder.response(3)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["w5", "w10", "w11"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5, -0.5]
    assert logprobs["top_logprobs"][0] == {"w5": -0.5, "w6": -1.0}
    assert logprobs["top_logprobs"][2] == {"w11": -0.5, "w10": -1.0}
    assert logprobs["text_offset"] == [0, 3, 3]  # offsets into the text sent before each token


def test_completion_top_logprobs_keep_an_unlikely_sampled_token():
    stream = CompletionStream("r", "m", 1, tokenizer=TOKENIZER, logprobs=1)
    sampled_last = {5: -3.0, 6: -0.1, 7: -0.2}
    chunks = stream.on_delta(delta(out(0, " w5", [5], [sampled_last])))
    assert chunks[0]["choices"][0]["logprobs"]["top_logprobs"] == [{"w6": -0.1, "w5": -3.0}]


def test_infinite_logprobs_become_finite_json():
    stream = ChatStream("r", "m", 1, tokenizer=TOKENIZER, top_logprobs=1)
    chunks = stream.on_delta(delta(out(0, " w5", [5], [{5: -math.inf, 6: -1.0}])))
    entry = chunks[1]["choices"][0]["logprobs"]["content"][0]
    assert entry["logprob"] == -9999.0
    json.loads(sse_event(chunks[1])[len("data: "):])  # strict JSON: no -Infinity


def test_real_engine_deltas_stream_and_build_the_same_text(tiny_llama):
    from pagedserve.config import EngineConfig
    from pagedserve.replicas.engine.engine_client import EngineClient

    request = parse_chat_request(chat(n=2, temperature=0.8, seed=1, max_tokens=8, ignore_eos=True,
                                      logprobs=True, top_logprobs=2, stream=True,
                                      stream_options={"include_usage": True}))
    params = to_sampling_params(request, max_model_len=128, prompt_len=4)

    async def run() -> list[RequestOutput]:
        engine = EngineClient(
            EngineConfig(model=str(tiny_llama), device="cpu", num_kvcache_blocks=32),
            torch_threads=1)
        try:
            return [d async for d in await engine.add_request([5, 9, 100, 7], params)]
        finally:
            await engine.shutdown()

    deltas = asyncio.run(run())
    stream = ChatStream.for_request(request, "r", "tiny", 1, tokenizer=TOKENIZER)
    builder = ChatResponseBuilder.for_request(request, "r", "tiny", 1, tokenizer=TOKENIZER)
    chunks = []
    for d in deltas:
        chunks += stream.on_delta(d)
        builder.add(d)
    chunks += stream.finish(prompt_tokens=4)
    response = builder.response(prompt_tokens=4)
    for choice in response["choices"]:
        engine_text = "".join(c.text for d in deltas for c in d.outputs
                              if c.index == choice["index"])
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]
                           if c["choices"][0]["index"] == choice["index"])
        assert choice["message"]["content"] == streamed == engine_text != ""
        assert len(choice["logprobs"]["content"]) == 8 and choice["finish_reason"] == "length"
    assert chunks[-1]["usage"] == response["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}


# ---- errors, SSE, models --------------------------------------------------------------------

def test_api_error_shapes_and_helpers():
    err = APIError.bad_request("bad", "temperature")
    assert err.to_dict() == {"error": {"message": "bad", "type": "invalid_request_error",
                                       "param": "temperature", "code": None}}
    assert (APIError.not_found("no").status, APIError.too_large("big").status) == (404, 413)
    assert APIError.model_not_found("x").to_dict()["error"]["code"] == "model_not_found"
    assert APIError.unauthorized().status == 401
    busy = APIError.overloaded(retry_after=1.2)
    assert (busy.status, busy.type, busy.headers()) == (503, "service_unavailable",
                                                         {"Retry-After": "2"})
    assert APIError.rate_limited("slow", 0.1).headers() == {"Retry-After": "1"}
    assert err.headers() == {}


def test_sse_framing():
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
    event = sse_error(APIError.overloaded())
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["error"]["type"] == "service_unavailable"


def test_models_list():
    payload = models_list(["a", "b"], created=7)
    assert payload["object"] == "list" and [m["id"] for m in payload["data"]] == ["a", "b"]
    assert payload["data"][0] == {"id": "a", "object": "model", "created": 7,
                                  "owned_by": "pagedserve"}
    openai = pytest.importorskip("openai")
    for entry in payload["data"]:
        openai.types.Model.model_validate(entry)


def test_structured_output_fields_map_to_one_grammar():
    from pagedserve.sampling_params import StructuredOutput

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    def spec(**fields):
        return to_sampling_params(parse_chat_request(chat(**fields)), 100, 10).structured

    assert spec() is None and spec(response_format={"type": "text"}) is None
    assert spec(response_format={"type": "json_object"}) == StructuredOutput(json_object=True)
    assert spec(response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": schema, "strict": False}}) == StructuredOutput(
        json_schema=json.dumps(schema, sort_keys=True), strict=False)
    assert spec(guided_json=schema) == StructuredOutput(json_schema=json.dumps(schema,
                                                                               sort_keys=True))
    assert spec(guided_regex="[ab]+") == StructuredOutput(regex="[ab]+")
    assert spec(guided_choice=["x", "y"]) == StructuredOutput(choice=("x", "y"))
    completion_spec = to_sampling_params(parse_completion_request(completion(
        guided_choice=["x"])), 100, 10).structured
    assert completion_spec == StructuredOutput(choice=("x",))
    with pytest.raises(APIError) as err:
        spec(guided_json="[1, 2]")
    assert err.value.param == "guided_json"


def test_a_received_data_line_reads_back_as_the_event_it_was_sent_as():
    from pagedserve.cluster.openai_errors import APIError
    from pagedserve.cluster.openai_sse import SSE_DONE, sse_data, sse_error, sse_event

    chunk = {"choices": [{"index": 0, "text": "héllo"}]}
    assert sse_data(sse_event(chunk).strip()) == chunk
    error = sse_data(sse_error(APIError(400, "bad", "invalid_request_error")).strip())
    assert error["error"]["message"] == "bad"
    assert [sse_data(line) for line in (SSE_DONE.strip(), "", ": keep-alive", "event: x")] == \
        [None] * 4
