"""From a validated request to engine prompts: completions prompt lists and chat templates."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    normalise_prompt,
)
from pagedserve.cluster.openai_tools import template_tools

try:  # transformers renders chat templates with jinja2 but does not depend on it
    from jinja2 import TemplateError
except ImportError:  # pragma: no cover - then apply_chat_template cannot run at all
    TemplateError = ValueError

# Chat templates written before OpenAI added the role know only "system".
_TEMPLATE_ROLES = {"developer": "system"}


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """Each prompt of a completions request, as text or token ids, in request order.

    Choice `i` of prompt `p` is choice index `p * request.n + i` in the response.
    """
    try:
        return normalise_prompt(request.prompt)
    except ValueError as err:
        raise APIError.bad_request(f"Invalid 'prompt': {err}.", "prompt") from None


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as the plain `{"role", "content"}` dicts chat templates expect."""
    messages = []
    for message in request.messages:
        entry = {"role": _TEMPLATE_ROLES.get(message.role, message.role), "content": message.text}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [_template_call(c) for c in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    return messages


def _template_call(call: dict) -> dict:
    """An earlier call as templates expect it: `arguments` parsed (OpenAI sends a string)."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # not JSON: the template gets the string
            function["arguments"] = json.loads(arguments)
    return {**call, "type": call.get("type", "function"), "function": function}


def render_chat(request: ChatCompletionRequest, tokenizer) -> list[int]:
    """Prompt token ids: the tokenizer's chat template applied with a generation prompt.

    A tokenizer without a chat template, or a template that refuses the conversation (say, roles
    that do not alternate), is the client's problem: APIError 400 on `messages`.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError.bad_request("This model has no chat template; use /v1/completions.",
                                   "messages")
    try:
        tools = template_tools(request)
        rendered = tokenizer.apply_chat_template(
            chat_messages(request), add_generation_prompt=True, tokenize=True,
            **({"tools": tools} if tools else {}))
    except (TemplateError, ValueError, TypeError) as err:
        raise APIError.bad_request(f"The chat template rejected the messages: {err}",
                                   "messages") from err
    return _token_ids(rendered)


def _token_ids(rendered) -> list[int]:
    """Plain ids from what apply_chat_template returns: a list, or (transformers 5) a
    BatchEncoding / dict holding `input_ids`."""
    if isinstance(rendered, Mapping) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    if isinstance(rendered, Sequence) and rendered and isinstance(rendered[0], Sequence):
        if len(rendered) != 1:
            raise ValueError(f"expected one rendered conversation, got {len(rendered)}")
        rendered = rendered[0]
    return [int(t) for t in rendered]
