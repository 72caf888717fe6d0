"""vLLM's `POST /tokenize` and `POST /detokenize`: the served tokenizer, without generating.

    /tokenize    {"prompt": str, "add_special_tokens": true} or {"messages": [...],
                 "add_generation_prompt": true}, optional "return_token_strs"
                 -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [int]} -> {"prompt": str}
A chat's tokens are the ones a chat completion's prompt would be (the same template), so
`count` equals its `usage.prompt_tokens`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_prompts import chat_messages, render_chat
from pagedserve.cluster.openai_requests import (
    ChatCompletionRequest,
    NonNegativeInt,
    validate_body,
)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[NonNegativeInt] = Field(max_length=1 << 20)


def tokenize(body: object, tokenizer, max_model_len: int) -> dict:
    """The `/tokenize` answer; APIError 400 for a bad body."""
    request = validate_body(TokenizeRequest, body)
    if (request.prompt is None) == (request.messages is None):
        raise APIError.bad_request("give exactly one of prompt or messages.", "prompt")
    if request.messages is not None:
        chat = validate_body(ChatCompletionRequest, {"messages": request.messages})
        tokens = render_chat(chat, tokenizer) if request.add_generation_prompt else \
            _render_without_generation_prompt(chat, tokenizer)
    else:
        tokens = list(tokenizer.encode(request.prompt,
                                       add_special_tokens=request.add_special_tokens))
    answer = {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}
    if request.return_token_strs:
        answer["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
    return answer


def detokenize(body: object, tokenizer, vocab_size: int) -> dict:
    """The `/detokenize` answer; APIError 400 for a bad body or an id outside the vocabulary."""
    request = validate_body(DetokenizeRequest, body)
    outside = [t for t in request.tokens if t >= vocab_size]
    if outside:
        raise APIError.bad_request(f"token id {outside[0]} is outside the vocabulary (size "
                                   f"{vocab_size}).", "tokens")
    return {"prompt": tokenizer.decode(request.tokens)}


def _render_without_generation_prompt(chat: ChatCompletionRequest, tokenizer) -> list[int]:
    rendered = tokenizer.apply_chat_template(chat_messages(chat), add_generation_prompt=False,
                                             tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))

