"""Map a validated OpenAI request onto the engine's SamplingParams."""

from __future__ import annotations

import json
import re

from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_requests import ChatCompletionRequest, CompletionRequest
from pagedserve.cluster.openai_tools import tool_grammar
from pagedserve.sampling_params import SamplingParams, StructuredOutput

OpenAIRequest = ChatCompletionRequest | CompletionRequest
COMPLETION_DEFAULT_MAX_TOKENS = 16


def to_sampling_params(request: OpenAIRequest, max_model_len: int,
                       prompt_len: int) -> SamplingParams:
    """SamplingParams for one prompt of `prompt_len` tokens; APIError 400 on a bad combination.

    Without max tokens in the request a chat completion may fill the context (vLLM's default)
    and a completion stops at 16 tokens (OpenAI's and vLLM's default there).
    """
    max_tokens_param = _max_tokens_param(request)
    requested = getattr(request, max_tokens_param)
    if requested is None and isinstance(request, CompletionRequest):
        requested = min(COMPLETION_DEFAULT_MAX_TOKENS, max(1, max_model_len - prompt_len))
    max_tokens = _checked_max_tokens(requested, max_tokens_param, max_model_len, prompt_len,
                                     _prompt_param(request))
    try:
        return SamplingParams(**_fields(request), max_tokens=max_tokens)
    except ValueError as err:
        raise _sampling_error(err, request, max_tokens_param) from None


def request_logprobs(request: OpenAIRequest) -> int | None:
    """How many alternatives per token to return, or None for no logprobs at all."""
    if isinstance(request, ChatCompletionRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def request_prompt_logprobs(request: OpenAIRequest) -> int | None:
    """How many alternatives per prompt token the engine computes (None: no prompt logprobs):
    vLLM's `prompt_logprobs`, and an echo with `logprobs` shows the prompt's (as vLLM does).
    An echo with `max_tokens: 0` only runs the prompt, which the engine does by scoring it."""
    if not isinstance(request, CompletionRequest):
        return None
    prompt_only = 0 if request.echo and request.max_tokens == 0 else None
    wanted = [request.prompt_logprobs, request.logprobs if request.echo else None, prompt_only]
    wanted = [n for n in wanted if n is not None]
    return max(wanted) if wanted else None


def _fields(request: OpenAIRequest) -> dict:
    def given(value, default):
        return default if value is None else value

    return dict(
        n=request.n,
        temperature=given(request.temperature, 1.0),
        top_p=given(request.top_p, 1.0),
        top_k=given(request.top_k, 0),
        min_p=given(request.min_p, 0.0),
        presence_penalty=given(request.presence_penalty, 0.0),
        frequency_penalty=given(request.frequency_penalty, 0.0),
        repetition_penalty=given(request.repetition_penalty, 1.0),
        min_tokens=given(request.min_tokens, 0),
        stop=list(request.stop or []),
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=given(request.ignore_eos, False),
        seed=request.seed,
        logprobs=request_logprobs(request),
        prompt_logprobs=request_prompt_logprobs(request),
        include_stop_str_in_output=given(request.include_stop_str_in_output, False),
        skip_special_tokens=given(request.skip_special_tokens, True),
        logit_bias={int(k): v for k, v in request.logit_bias.items()} if request.logit_bias
        else None,
        structured=structured_output(request) or tool_grammar(request),
    )


def structured_output(request: OpenAIRequest) -> StructuredOutput | None:
    """The grammar the request asks for (`response_format`, or vLLM's `guided_*`), if any."""
    fmt = getattr(request, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        return StructuredOutput(json_object=True)
    if fmt is not None and fmt.type == "json_schema":
        return StructuredOutput(json_schema=json.dumps(fmt.json_schema.schema_, sort_keys=True),
                                strict=fmt.json_schema.strict is not False)
    if request.guided_json is not None:
        schema = request.guided_json
        try:
            text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
            return StructuredOutput(json_schema=text)
        except ValueError as err:
            raise APIError.bad_request(f"Invalid 'guided_json': {_plain(err)}.",
                                       "guided_json") from None
    if request.guided_regex is not None:
        return StructuredOutput(regex=request.guided_regex)
    if request.guided_choice is not None:
        return StructuredOutput(choice=tuple(request.guided_choice))
    return None


def structured_param(request: OpenAIRequest) -> str | None:
    """The request field that asked for structured output (for its errors)."""
    asked = [f for f in request.structured_fields() if getattr(request, f) is not None]
    return asked[0] if asked else ("tools" if getattr(request, "tools", None) else None)


def _plain(err: ValueError) -> str:
    return _FIELD_IN_MESSAGE.sub("", str(err))


def _max_tokens_param(request: OpenAIRequest) -> str:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def _prompt_param(request: OpenAIRequest) -> str:
    return "messages" if isinstance(request, ChatCompletionRequest) else "prompt"


def _checked_max_tokens(requested: int | None, param: str, max_model_len: int, prompt_len: int,
                        prompt_param: str) -> int:
    if prompt_len >= max_model_len:
        raise APIError.bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{prompt_param} resulted in {prompt_len} tokens, which leaves no room for a "
            f"completion. Please reduce the length of the {prompt_param}.", prompt_param,
            "context_length_exceeded")
    if requested is None:
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise APIError.bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, "
            f"{requested} in the completion). Please reduce the length of the {prompt_param} or "
            "completion.", param, "context_length_exceeded")
    return requested


_FIELD_IN_MESSAGE = re.compile(r"^SamplingParams\.(\w+) ")


def _sampling_error(err: ValueError, request: OpenAIRequest, max_tokens_param: str) -> APIError:
    """SamplingParams names its own fields; name the request's field instead."""
    text = str(err)
    match = _FIELD_IN_MESSAGE.match(text)
    field = match.group(1) if match else None
    if field == "max_tokens":
        field = max_tokens_param
    elif field == "logprobs" and isinstance(request, ChatCompletionRequest):
        field = "top_logprobs"
    message = _FIELD_IN_MESSAGE.sub("", text) if match else text
    return APIError.bad_request(f"Invalid '{field}': {message}." if field else message, field)
