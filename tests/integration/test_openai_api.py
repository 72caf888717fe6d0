"""The official openai client against `serve run ray_configs/local.yaml`."""

import json

import pytest

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.integration


def test_models_list(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_models_retrieve_and_an_unknown_model_is_404(openai_client):
    import openai

    model = openai_client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "pagedserve")
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.models.retrieve("gpt-9")
    assert err.value.body["code"] == "model_not_found"


def test_chat_completion_answers(openai_client):
    out = openai_client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                max_tokens=16)
    choice = out.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_chat_concatenates_to_the_unary_greedy_text(openai_client):
    kwargs = dict(model=MODEL, temperature=0, max_tokens=24,
                  messages=[{"role": "user", "content": "Write one sentence about the sea."}])
    unary = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    pieces, usage, finish = [], None, None
    stream = openai_client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == unary
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completion_with_several_prompts_and_n(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt=["The sky is", "Once upon a"],
                                           temperature=0, max_tokens=6, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both completions agree
    assert all(c.text for c in out.choices)
    assert 4 <= out.usage.completion_tokens <= 4 * 6


def test_completion_from_token_ids_with_logprobs(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt=[504, 3485, 314], temperature=0,
                                           max_tokens=4, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
DESCRIBE = [{"role": "user", "content": "Describe a person as JSON."}]


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                   "strict": True}}


def test_json_schema_answers_parse_and_validate_also_streamed(openai_client):
    import jsonschema

    fmt = _json_schema_format(PERSON)
    unary = openai_client.chat.completions.create(
        model=MODEL, messages=DESCRIBE, temperature=0, max_tokens=100, response_format=fmt)
    jsonschema.validate(json.loads(unary.choices[0].message.content), PERSON)
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=DESCRIBE, temperature=0, max_tokens=100, response_format=fmt,
        stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == unary.choices[0].message.content


def test_the_sdks_parse_returns_the_typed_object(openai_client):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    reply = openai_client.chat.completions.parse(
        model=MODEL, messages=DESCRIBE, temperature=0, max_tokens=100, response_format=Person)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_json_object_parses(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply with a JSON object with the keys city and "
                                              "country for Paris."}])
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_schema_that_does_not_compile_is_a_400_naming_response_format(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(
            model=MODEL, messages=DESCRIBE, max_tokens=10,
            response_format=_json_schema_format({"type": "strin"}))
    assert err.value.body["param"] == "response_format"
    assert "does not compile" in err.value.body["message"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_named_tool_choice_yields_a_valid_call_also_streamed(openai_client):
    kwargs = dict(model=MODEL, messages=WEATHER_ASK, temperature=0, max_tokens=60,
                  tools=[WEATHER_TOOL, TIME_TOOL],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    unary = openai_client.chat.completions.create(**kwargs).choices[0]
    assert unary.finish_reason == "tool_calls" and unary.message.content is None
    (call,) = unary.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(
        json.loads(call.function.arguments)["city"], str)
    deltas = [c.choices[0].delta for c in openai_client.chat.completions.create(
        **kwargs, stream=True) if c.choices]
    joined = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
    assert joined == call.function.arguments


def test_a_required_tool_choice_calls_one_of_the_tools_and_the_result_goes_back(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, temperature=0, max_tokens=80,
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls"
    assert call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)
    follow_up = openai_client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=20, tools=[WEATHER_TOOL, TIME_TOOL],
        messages=[*WEATHER_ASK, {"role": "assistant", "content": None,
                                 "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")
