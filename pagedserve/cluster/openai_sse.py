"""Server-sent events framing for OpenAI streams."""

from __future__ import annotations

import json

from pagedserve.cluster.openai_errors import APIError

SSE_DONE = "data: [DONE]\n\n"
DATA = "data: "


def sse_data(line: str) -> dict | None:
    """The JSON object of one received `data:` line of an OpenAI stream (a chunk, or an error
    event under "error"); None for any other line, `[DONE]` included."""
    if not line.startswith(DATA + "{"):
        return None
    return json.loads(line[len(DATA):])


def sse_event(obj: dict) -> str:
    """One `data:` event. Non-ASCII text stays UTF-8 (the response body is UTF-8)."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(err: APIError) -> str:
    """An error after the stream started (the status line is already sent): an event whose
    data is the error object, which OpenAI SDKs raise. Follow it with `SSE_DONE`. Non-ASCII is
    escaped: a message may quote client input holding lone surrogates, which UTF-8 refuses."""
    return f"data: {json.dumps(err.to_dict(), separators=(',', ':'))}\n\n"
