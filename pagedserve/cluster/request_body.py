"""A request body's JSON, checked before any handler sees it: its nesting depth is bounded and
every string is valid Unicode (JSON may spell lone surrogates, `"\\udc00"`, which no tokenizer
or UTF-8 encoder accepts). Either fault is the client's: APIError 400, never a 500."""

from __future__ import annotations

import json

from pagedserve.cluster.openai_errors import APIError

MAX_JSON_DEPTH = 64  # an OpenAI request nests 5-6 levels; tool schemas a few more


def parse_json_body(body: bytes | bytearray) -> object:
    """The body's JSON value; APIError 400 for bad JSON, too deep a nesting or bad Unicode."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as err:  # also a body that is not UTF-8
        raise APIError.bad_request(f"request body is not valid JSON: {err}") from None
    check_json_value(value)
    return value


def check_json_value(value: object, max_depth: int = MAX_JSON_DEPTH) -> None:
    """APIError 400 when `value` nests deeper than `max_depth` or holds a string (or key) that
    is not valid Unicode. Iterative: no recursion limit to hit on hostile input."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise _too_deep(max_depth)
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                items = item.values()
            else:
                items = item
            stack.extend((child, depth + 1) for child in items
                         if isinstance(child, str | dict | list))


def unicode_fault(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone surrogate, and where), or None if it is."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"{err.reason} at position {err.start}"
    return None


def _check_text(text: str) -> None:
    if (fault := unicode_fault(text)) is not None:
        raise APIError.bad_request(f"request body holds a string that is not valid Unicode "
                                   f"({fault})")


def _too_deep(max_depth: int = MAX_JSON_DEPTH) -> APIError:
    return APIError.bad_request(f"request body nests deeper than {max_depth} levels")
