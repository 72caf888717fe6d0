"""Results returned by the engine and the offline `LLM` API (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    `logprobs`, when requested, holds one dict per generated token mapping token id to its
    log-probability (the sampled token plus the top-`logprobs` alternatives).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far.

    `prompt_logprobs`, when requested, is aligned with `prompt_token_ids`: None for the first
    token (nothing precedes it), then a dict mapping token id to log-probability (the prompt
    token plus the top-`prompt_logprobs` alternatives). A request's deltas carry it once.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
