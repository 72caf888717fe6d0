"""Request bodies that used to reach a handler as 500s: deep nesting and lone surrogates."""

import json

import pytest

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.request_body import MAX_JSON_DEPTH, parse_json_body, unicode_fault


def _bad(body: bytes) -> APIError:
    with pytest.raises(APIError) as err:
        parse_json_body(body)
    assert err.value.status == 400
    return err.value


def test_a_good_body_parses():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓"}], "n": 1}
    assert parse_json_body(json.dumps(body).encode()) == body


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 3_000, 50_000])
def test_nesting_past_the_bound_is_400(depth):
    body = b'{"model": "m", "extra": ' + b"[" * depth + b"]" * depth + b"}"
    assert "nests deeper" in str(_bad(body))


def test_nesting_at_the_bound_parses():
    depth = MAX_JSON_DEPTH - 1  # inside the outer object
    body = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    value = parse_json_body(body)["x"]
    for _ in range(depth - 1):
        (value,) = value
    assert value == []


@pytest.mark.parametrize("body", [
    b'{"prompt": "a\\udc00b"}', b'{"model": "\\ud800"}', b'{"\\ud800": 1}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
])
def test_a_lone_surrogate_anywhere_is_400(body):
    assert "not valid Unicode" in str(_bad(body))


def test_a_surrogate_pair_is_valid_unicode():
    assert parse_json_body(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001F600"}
    assert unicode_fault("\U0001F600") is None and unicode_fault("a\udc00") is not None


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b""])
def test_bad_json_is_400(body):
    assert "not valid JSON" in str(_bad(body))
