"""Tool calls: the grammar that makes a model call a tool, and its answer as `tool_calls`.

- `tool_choice` a named function: the answer is that function's arguments, decoded under the
  grammar of its `parameters` schema, so any model calls it with valid arguments.
- `required`: the answer is `{"name", "arguments"}` for one of the tools (a list of them when
  `parallel_tool_calls` is not false), under the grammar of their schemas.
- `auto` (the default with tools): the tools go into the chat template; the model decides.
  An answer that is a call in the common forms (`<tool_call>{...}</tool_call>` as Hermes,
  Qwen and SmolLM3 templates ask, or a bare `{"name", "arguments"}` object) becomes
  `tool_calls`; any other answer is content.
- `none`: no tools in the prompt, plain content.
A tool-call answer has `content: null` and `finish_reason: "tool_calls"`. A streamed request
with tools gets its answer's chunks when generation ends (a call must be whole to be told from
content), as one content or tool-calls delta per choice.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator

from pagedserve.sampling_params import StructuredOutput

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
MAX_PARALLEL_CALLS = 8


def tool_mode(request) -> str | None:
    """"named", "required" or "auto" when the request's tools shape the answer, else None."""
    if not getattr(request, "tools", None):
        return None
    choice = request.tool_choice
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    return "required" if choice == "required" else "named"


def tool_grammar(request) -> StructuredOutput | None:
    """The grammar of a named or required tool call (None for `auto` and `none`)."""
    mode = tool_mode(request)
    if mode == "named":
        return StructuredOutput(json_schema=_dumps(_parameters(_named_tool(request))))
    if mode != "required":
        return None
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name},
                             "arguments": _parameters(t)}} for t in request.tools]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if request.parallel_tool_calls is False:
        return StructuredOutput(json_schema=_dumps(call))
    return StructuredOutput(json_schema=_dumps(
        {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}))


def template_tools(request) -> list[dict] | None:
    """The tools as chat templates take them, or None when the prompt should not list them."""
    if tool_mode(request) is None:
        return None
    return [{"type": "function", "function": t.function.model_dump(by_alias=True,
                                                                   exclude_none=True)}
            for t in request.tools]


def tool_calls_of(text: str, request) -> list[dict] | None:
    """The calls an answer makes, as OpenAI `tool_calls`, or None if it is content."""
    mode = tool_mode(request)
    if mode == "named":
        return [_call(_named_tool(request).function.name, text)]
    parsed = _calls_in(text) if mode == "auto" else _json(text)
    if mode == "required" and isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list) or not parsed:
        return None
    known = {t.function.name for t in request.tools}
    calls = []
    for item in parsed:
        if not isinstance(item, dict) or item.get("name") not in known:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(_call(item["name"], arguments if isinstance(arguments, str)
                           else json.dumps(arguments)))
    return calls


def with_tool_calls(response: dict, request) -> dict:
    """A unary `chat.completion` with each choice's call content turned into `tool_calls`."""
    for choice in response["choices"]:
        message = choice["message"]
        calls = tool_calls_of(message.get("content") or "", request)
        if calls is not None:
            message["content"], message["tool_calls"] = None, calls
            choice["finish_reason"] = "tool_calls"
    return response


async def streamed_tool_calls(chunks: AsyncIterator[dict], request) -> AsyncIterator[dict]:
    """The chunk stream with each choice's content held until it ends, then sent as one
    delta: its tool calls (each with its index), or the content it was."""
    held: dict[int, list[str]] = {}
    async for chunk in chunks:
        choices = chunk.get("choices") or []
        if not choices:  # the usage chunk
            yield chunk
            continue
        choice = choices[0]
        delta, index = choice.get("delta") or {}, choice["index"]
        if delta.get("role"):
            yield chunk
            continue
        held.setdefault(index, []).append(delta.get("content") or "")
        if choice.get("finish_reason") is None:
            continue
        text = "".join(held.pop(index))
        calls = tool_calls_of(text, request)
        if calls is None:
            body = {"content": text}
        else:
            body = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
        yield {**chunk, "choices": [{**choice, "delta": body, "finish_reason": None,
                                     "logprobs": None}]}
        reason = "tool_calls" if calls is not None else choice["finish_reason"]
        yield {**chunk, "choices": [{**choice, "delta": {}, "finish_reason": reason,
                                     "logprobs": None}]}


def _calls_in(text: str):
    tagged = _TAGGED.findall(text)
    if tagged:
        found = [_json(t) for t in tagged]
        return found if all(isinstance(f, dict) for f in found) else None
    whole = _json(text.strip())
    return [whole] if isinstance(whole, dict) and "name" in whole else whole


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _named_tool(request):
    name = request.tool_choice.function.name
    return next(t for t in request.tools if t.function.name == name)


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _dumps(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True)
