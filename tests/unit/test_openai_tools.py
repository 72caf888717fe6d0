"""Tool calls: requests, the grammar of a forced call, and answers turned into `tool_calls`."""

from __future__ import annotations

import asyncio
import json

import pytest

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_requests import parse_chat_request
from pagedserve.cluster.openai_tools import (
    streamed_tool_calls,
    tool_calls_of,
    tool_grammar,
    tool_mode,
    with_tool_calls,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def chat(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER, TIME], **extra}


def named(name="get_weather") -> dict:
    return {"type": "function", "function": {"name": name}}


def test_modes():
    assert tool_mode(parse_chat_request(chat())) == "auto"
    assert tool_mode(parse_chat_request(chat(tool_choice="none"))) is None
    assert tool_mode(parse_chat_request(chat(tool_choice="required"))) == "required"
    assert tool_mode(parse_chat_request(chat(tool_choice=named()))) == "named"
    no_tools = chat()
    del no_tools["tools"]
    assert tool_mode(parse_chat_request(no_tools)) is None


@pytest.mark.parametrize("body, param", [
    (chat(tool_choice=named("nope")), "tool_choice"),
    (chat(tools=[WEATHER, WEATHER]), "tools"),
    ({**chat(tool_choice="required"), "tools": None}, "tool_choice"),
    (chat(tool_choice="sometimes"), "tool_choice"),
    (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
    (chat(tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
])
def test_bad_tool_requests_are_400(body, param):
    with pytest.raises(APIError) as err:
        parse_chat_request(body)
    assert err.value.status == 400 and err.value.param == param


def test_a_named_call_is_decoded_as_its_arguments():
    request = parse_chat_request(chat(tool_choice=named()))
    assert json.loads(tool_grammar(request).json_schema) == WEATHER["function"]["parameters"]
    (call,) = tool_calls_of('{"city": "Paris"}', request)
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_required_call_picks_one_of_the_tools():
    request = parse_chat_request(chat(tool_choice="required", parallel_tool_calls=False))
    schema = json.loads(tool_grammar(request).json_schema)
    assert [c["properties"]["name"]["const"] for c in schema["anyOf"]] == ["get_weather",
                                                                          "get_time"]
    calls = tool_calls_of('{"name": "get_time", "arguments": {}}', request)
    assert [c["function"] for c in calls] == [{"name": "get_time", "arguments": "{}"}]
    parallel = parse_chat_request(chat(tool_choice="required"))
    assert json.loads(tool_grammar(parallel).json_schema)["type"] == "array"
    two = tool_calls_of('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", '
                        '"arguments": {"city": "Rome"}}]', parallel)
    assert [c["function"]["name"] for c in two] == ["get_time", "get_weather"]


@pytest.mark.parametrize("text, names", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     ["get_weather"]),
    ('{"name": "get_time", "parameters": {}}', ["get_time"]),
    ("It is sunny in Paris.", None),
    ('{"name": "unknown_tool", "arguments": {}}', None),
    ('<tool_call>not json</tool_call>', None),
])
def test_auto_finds_calls_in_the_common_forms_and_leaves_content_alone(text, names):
    request = parse_chat_request(chat())
    assert tool_grammar(request) is None
    calls = tool_calls_of(text, request)
    assert (None if calls is None else [c["function"]["name"] for c in calls]) == names


def test_a_unary_answer_with_a_call_has_null_content_and_finish_reason_tool_calls():
    request = parse_chat_request(chat(tool_choice=named()))
    response = {"choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": '{"city": "Oslo"}'}}]}
    choice = with_tool_calls(response, request)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'


def _chunks(pieces: list[str], reason: str = "stop"):
    async def gen():
        yield {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]}
        for piece in pieces:
            yield {"id": "c", "choices": [{"index": 0, "delta": {"content": piece},
                                           "logprobs": None, "finish_reason": None}]}
        yield {"id": "c", "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": reason}]}
        yield {"id": "c", "choices": [], "usage": {"completion_tokens": 3}}
    return gen()


async def _collect(stream) -> list[dict]:
    return [chunk async for chunk in stream]


def test_a_streamed_call_is_one_tool_calls_delta_then_the_finish():
    request = parse_chat_request(chat(tool_choice=named(), stream=True))
    out = asyncio.run(_collect(streamed_tool_calls(_chunks(['{"city"', ': "Rome"}']), request)))
    assert out[0]["choices"][0]["delta"]["role"] == "assistant"
    (call,) = out[1]["choices"][0]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"]["arguments"] == '{"city": "Rome"}'
    assert out[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[3]["usage"] == {"completion_tokens": 3}


def test_streamed_content_that_is_no_call_arrives_whole():
    request = parse_chat_request(chat(stream=True))
    out = asyncio.run(_collect(streamed_tool_calls(_chunks(["It is ", "sunny."]), request)))
    assert out[1]["choices"][0]["delta"] == {"content": "It is sunny."}
    assert out[2]["choices"][0]["finish_reason"] == "stop"
