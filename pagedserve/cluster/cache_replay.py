"""Cache entries: a unary response stored without its `id` and `created`, answered again as a
unary response with fresh ones, or replayed as SSE chunks shaped like a live stream's.

Streams and unary calls share entries: a stream stores the unary response its chunks fold into.
"""

from __future__ import annotations

import json

_CHUNK_OBJECTS = {"chat.completion": "chat.completion.chunk", "text_completion": "text_completion"}
_ID_PREFIXES = {"chat.completion": "chatcmpl-", "text_completion": "cmpl-"}


def to_entry(response: dict) -> bytes:
    """The bytes to store for a finished unary response."""
    kept = {k: v for k, v in response.items() if k not in ("id", "created")}
    return json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode()


def from_entry(entry: bytes) -> dict:
    return json.loads(entry)


def unary_response(stored: dict, request_id: str, created: int) -> dict:
    """The stored response with this request's `id` and `created`."""
    return {"id": _ID_PREFIXES[stored["object"]] + request_id, "object": stored["object"],
            "created": created, **{k: v for k, v in stored.items() if k != "object"}}


def replay_chunks(stored: dict, request_id: str, created: int, include_usage: bool) -> list[dict]:
    """The chunks a live stream would have sent for this response (one content chunk per
    choice), then the usage chunk when `include_usage`."""
    chat = stored["object"] == "chat.completion"
    envelope = {"id": _ID_PREFIXES[stored["object"]] + request_id,
                "object": _CHUNK_OBJECTS[stored["object"]], "created": created,
                "model": stored["model"]}
    if include_usage:
        envelope["usage"] = None
    pieces = []
    for choice in stored["choices"]:
        pieces += _chat_pieces(choice) if chat else _completion_pieces(choice)
    chunks = [{**envelope, "choices": [piece]} for piece in pieces]
    if include_usage:
        chunks.append({**envelope, "choices": [], "usage": stored["usage"]})
    return chunks


def _chat_pieces(choice: dict) -> list[dict]:
    index, text = choice["index"], choice["message"]["content"]
    pieces = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
               "finish_reason": None}]
    logprobs = choice["logprobs"]
    if text or (logprobs and logprobs["content"]):
        pieces.append({"index": index, "delta": {"content": text}, "logprobs": logprobs,
                       "finish_reason": None})
    pieces.append(_closing(choice, {"delta": {}}))
    return pieces


def _completion_pieces(choice: dict) -> list[dict]:
    pieces = []
    logprobs = choice["logprobs"]
    if choice["text"] or (logprobs and logprobs["tokens"]):
        pieces.append({"index": choice["index"], "text": choice["text"], "logprobs": logprobs,
                       "finish_reason": None})
    pieces.append(_closing(choice, {"text": ""}))
    return pieces


def _closing(choice: dict, empty: dict) -> dict:
    return {"index": choice["index"], **empty, "logprobs": None,
            "finish_reason": choice["finish_reason"], "stop_reason": choice["stop_reason"]}
