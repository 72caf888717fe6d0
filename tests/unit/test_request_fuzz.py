"""Random request bodies through the ingress's whole preparation (parse, validate, template,
tokenize, sampling params, grammar compile): each is accepted or refused with a 4xx APIError,
never another exception (which the HTTP layer would turn into a 500)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.request_body import parse_json_body
from pagedserve.cluster.service import OpenAIService, load_model_info
from pagedserve.config import ClusterConfig

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
          "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
          "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
          "skip_special_tokens", "guided_json", "guided_regex", "guided_choice",
          "response_format", "logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools",
          "tool_choice", "prompt_logprobs"]
SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "bot"]),
     "content": st.text(max_size=30) | JSON})
FORMATS = st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                           {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
                           {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}])
VALUES = {
    "model": st.just("SmolLM2-135M-Instruct") | st.text(max_size=10),
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 60_000), max_size=6) | JSON,
    "max_tokens": st.integers(-2, 10_000) | JSON,
    "echo": st.booleans() | JSON,
    "prompt_logprobs": st.integers(-2, 25) | JSON,
    "logit_bias": st.dictionaries(st.text(max_size=6), st.floats(-200, 200), max_size=3) | JSON,
    "response_format": FORMATS | JSON,
    "guided_regex": st.text(max_size=12) | JSON,
    "guided_choice": st.lists(st.text(max_size=6), max_size=3) | JSON,
}


@st.composite
def bodies(draw, required: str):
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=7, unique=True))
    body = {name: draw(VALUES.get(name, JSON)) for name in names}
    if draw(st.booleans()):
        body.setdefault(required, draw(VALUES[required]))
    return body


class _NoMetrics:
    def count_request(self, *args, **kwargs) -> None:
        pass

    def observe(self, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def service(default_model_dir):
    config = ClusterConfig()
    return OpenAIService(config, load_model_info(config), dispatcher=None, metrics=_NoMetrics())


def _prepare(service, prepare, body) -> None:
    try:
        prepared = prepare(body)
        asyncio.run(service.check_structured(prepared))
    except APIError as err:
        assert 400 <= err.status < 500, err


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(body=bodies("messages"))
def test_chat_bodies_are_served_or_refused_with_a_4xx(service, body):
    _prepare(service, service.prepare_chat, body)


@FUZZ
@given(body=bodies("prompt"))
def test_completion_bodies_are_served_or_refused_with_a_4xx(service, body):
    _prepare(service, service.prepare_completions, body)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_raw_bodies_parse_or_are_refused_with_a_400(raw):
    try:
        parse_json_body(raw)
    except APIError as err:
        assert err.status == 400
