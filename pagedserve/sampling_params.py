"""Per-request sampling settings, validated once at construction (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5
MAX_STOP_CHARS = 16_384  # all stop strings of a request together
MAX_LOGIT_BIAS_TOKENS = 1024
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar every completion follows: exactly one of a JSON schema (JSON text), any JSON
    object, a regular expression, or one string of `choice`."""

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    strict: bool = True  # with `json_schema`: no properties beyond the schema's

    def __post_init__(self) -> None:
        given = [self.json_schema is not None, self.json_object, self.regex is not None,
                 self.choice is not None]
        _check(sum(given) == 1, "structured",
               "needs exactly one of json_schema, json_object, regex or choice")
        _check(self.json_schema is None or (isinstance(self.json_schema, str)
                                            and _is_json_object_text(self.json_schema)),
               "structured", "json_schema must be the text of a JSON object")
        _check(self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
               "structured", "regex must be a non-empty string")
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice) if isinstance(
                self.choice, list | tuple) else self.choice)
            _check(isinstance(self.choice, tuple) and bool(self.choice)
                   and all(isinstance(c, str) and c for c in self.choice),
                   "structured", "choice must be a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    """How to sample one request's completions.

    `temperature=0` is greedy. Invalid values raise ValueError naming the field.
    Stop strings are never part of the returned text unless `include_stop_str_in_output`.
    `prompt_logprobs=N` returns each prompt token's log-prob given the tokens before it, with
    the N most likely alternatives; with it, `max_tokens=0` generates nothing (the prompt is
    only scored) and finishes with "length" once the prompt is computed.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # token id -> a number added to its logit before sampling (log-probs stay the model's own)
    logit_bias: dict[int, float] | None = None
    structured: StructuredOutput | None = None  # constrained decoding (JSON, regex, choice)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        if self.top_k == -1:  # vLLM spelling of "disabled"
            self.top_k = 0
        self._validate()
        self._validate_logit_bias()
        _check(self.structured is None or isinstance(self.structured, StructuredOutput),
               "structured", f"must be a StructuredOutput, got {type(self.structured).__name__}")
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature",
               f"must be >= 0, got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k",
               f"must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p",
               f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt alone
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= least),
               "max_tokens", f"must be an integer >= 1 (0 only with prompt_logprobs, to score "
               f"the prompt alone), got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               f"must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be a non-empty string or a list of non-empty strings")
        _check(sum(map(len, self.stop)) <= MAX_STOP_CHARS, "stop",
               f"at most {MAX_STOP_CHARS} characters in all, got {sum(map(len, self.stop))}")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be a list of non-negative integers")
        _check(self.seed is None or _is_int(self.seed), "seed",
               f"must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                   f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        _check(isinstance(bias, dict), "logit_bias",
               f"must be a dict of token id to number, got {type(bias).__name__}")
        _check(len(bias) <= MAX_LOGIT_BIAS_TOKENS, "logit_bias",
               f"may bias at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
        for token, value in bias.items():
            _check(_is_int(token) and token >= 0, "logit_bias",
                   f"keys must be non-negative token ids, got {token!r}")
            _check(_is_num(value) and abs(value) <= LOGIT_BIAS_RANGE, "logit_bias",
                   f"values must be numbers in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                   f"got {value!r} for token {token}")


def _is_json_object_text(text: str) -> bool:
    import json

    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _as_list(value: object, field_name: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"SamplingParams.{field_name} must be a list, got {type(value).__name__}")
    return list(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field_name} {message}")
