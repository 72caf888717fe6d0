"""Pydantic models of the OpenAI chat and completions requests, and their parse entry points.

Types are strict (a string is not a number, 1 is not `true`) as OpenAI's API is; unknown fields
are ignored because SDKs send fields we do not use. Fields that would change the output in ways
we cannot honour (suffix, chat's echo, ...) are refused with a 400 rather than ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pagedserve.cluster.openai_errors import APIError
from pagedserve.sampling_params import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS_TOKENS, MAX_LOGPROBS

MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; vLLM clients send more
MAX_N = 128
NonNegativeInt = Annotated[int, Field(ge=0)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
BiasValue = Annotated[float, Field(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    """`stream_options`: only `include_usage` is used."""

    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema every answer must follow."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with a 'schema'")
        return self


class _SamplingFields(BaseModel):
    """Fields shared by chat and completions requests, OpenAI's and vLLM's extras."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, BiasValue] | None = Field(None, max_length=MAX_LOGIT_BIAS_TOKENS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # vLLM's structured-output extras (chat requests also take `response_format`)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        return stops

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_token_ids(cls, value: Any) -> Any:
        """OpenAI's keys are token ids as JSON strings ("1234"); a handle call may send ints."""
        if not isinstance(value, dict):
            return value
        keys = [str(k) for k in value if not _is_token_id_key(k)]
        if keys:
            raise ValueError(f"keys must be token ids (non-negative integers), got {keys[0]!r}")
        return {str(k): v for k, v in value.items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError.bad_request(
                "stream_options is only allowed when stream is true.", "stream_options")
        asked = [name for name in self.structured_fields() if getattr(self, name) is not None]
        if len(asked) > 1:
            raise APIError.bad_request(
                f"at most one of {', '.join(asked)} may be given.", asked[1])

    def structured_fields(self) -> tuple[str, ...]:
        """The fields that ask for structured output, in this request kind."""
        return ("guided_json", "guided_regex", "guided_choice")


def _is_token_id_key(key: Any) -> bool:
    if isinstance(key, bool):
        return False
    if isinstance(key, int):
        return key >= 0
    return isinstance(key, str) and key.isascii() and key.isdigit()


class ChatMessage(BaseModel):
    """One chat message; `content` is a string or a list of text parts (joined by newlines)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are "
                                 "supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} needs a string 'text'")
        return value

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


class FunctionDef(BaseModel):
    """A tool's function: its name, what it does, and the JSON schema of its arguments."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions` body. `max_completion_tokens` wins over `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: LogprobCount | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    echo: bool | None = None  # refused: completions only
    prompt_logprobs: int | None = None  # refused: completions only

    def structured_fields(self) -> tuple[str, ...]:
        fields = super().structured_fields()
        if self.response_format is not None and self.response_format.type != "text":
            return ("response_format", *fields)
        return fields

    def check(self) -> None:
        """Rules across fields; raises APIError 400."""
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.bad_request("logprobs must be true when top_logprobs is set.",
                                       "top_logprobs")
        for name in ("echo", "prompt_logprobs"):
            if getattr(self, name) not in (None, False):
                raise APIError.bad_request(f"{name} is not supported by chat completions; use "
                                           "/v1/completions.", name)
        self._check_tools()

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise APIError.bad_request("tool function names must be unique.", "tools")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise APIError.bad_request("tool_choice needs tools.", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError.bad_request(f"tool_choice names {choice.function.name!r}, which is "
                                       "not one of the tools.", "tool_choice")
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and any(getattr(self, f) is not None for f in self.structured_fields()):
            raise APIError.bad_request("a required or named tool_choice cannot be combined with "
                                       "a structured response format.", "tool_choice")


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions` body; `prompt` is normalised to a list of strings or token lists."""

    prompt: list[str | list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt alone comes back
    logprobs: LogprobCount | None = None
    echo: bool | None = None
    prompt_logprobs: LogprobCount | None = None  # vLLM's
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_as_list(cls, value: Any) -> Any:
        return normalise_prompt(value)

    def check(self) -> None:
        """Rules across fields; raises APIError 400."""
        self._check_common()
        if self.max_tokens == 0 and not self.echo:
            raise APIError.bad_request("Invalid 'max_tokens': must be at least 1 (0 only with "
                                       "echo, to return the prompt alone) (got 0).", "max_tokens")
        if self.prompt_logprobs is not None and self.stream:
            raise APIError.bad_request("prompt_logprobs is not available when stream is true "
                                       "(echo with logprobs streams the prompt's).",
                                       "prompt_logprobs")
        if self.suffix:
            raise APIError.bad_request("suffix is not supported.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError.bad_request("best_of must equal n (best-of sampling is not supported).",
                                       "best_of")


def normalise_prompt(value: Any) -> list[str | list[int]]:
    """A string, strings, token ids or lists of token ids → a non-empty list of prompts."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty string, a list of strings, a list of token ids, "
                         "or a list of lists of token ids")
    if all(_is_int(t) for t in value):
        value = [value]
    for i, prompt in enumerate(value):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {i} is an empty string")
        elif isinstance(prompt, list) and prompt:
            bad = next((t for t in prompt if not _is_int(t) or t < 0), None)
            if bad is not None:
                raise ValueError(f"prompt {i} holds {bad!r}; token ids are non-negative integers")
        else:
            raise ValueError(f"prompt {i} must be a non-empty string or list of token ids")
    return value


def parse_chat_request(body: object) -> ChatCompletionRequest:
    """Validate a chat request body (a dict, or JSON text/bytes); every problem is APIError 400."""
    request = _parse(ChatCompletionRequest, body)
    request.check()
    return request


def parse_completion_request(body: object) -> CompletionRequest:
    """Validate a completions request body (a dict, or JSON text/bytes); problems are APIError 400."""
    request = _parse(CompletionRequest, body)
    request.check()
    return request


def _parse(model: type[BaseModel], body: object):
    if isinstance(body, str | bytes | bytearray):
        try:
            body = json.loads(body)
        except ValueError as err:
            raise APIError.bad_request(f"The request body is not valid JSON: {err}") from err
    return validate_body(model, body)


def validate_body(model: type[BaseModel], body: object):
    """`body` (a decoded JSON value) as `model`; APIError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError.bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error_to_api_error(err) from None


def validation_error_to_api_error(err: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field, e.g. `messages[0].content`."""
    first = err.errors(include_url=False)[0]
    param = _param_name(first["loc"])
    if first["type"] == "missing":
        return APIError.bad_request(f"Missing required parameter: '{param}'.", param)
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if got is None or isinstance(got, bool | int | float) or (isinstance(got, str)
                                                             and len(got) <= 40):
        message += f" (got {json.dumps(got)})"
    return APIError.bad_request(f"Invalid '{param}': {message}.", param)


def _param_name(loc: tuple) -> str:
    parts = ""
    for item in loc:
        if isinstance(item, int):
            parts += f"[{item}]"
        elif item.isidentifier():  # skips pydantic's union/validator tags such as 'list[int]'
            parts += f".{item}" if parts else item
    return parts or "body"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
