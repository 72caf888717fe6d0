"""The prompt in completions choices: OpenAI's `echo` and vLLM's `prompt_logprobs`.

With `echo`, every choice's text starts with its prompt's text and, with `logprobs`, its
logprobs object covers the prompt's tokens first (the first token's entries are null: nothing
precedes it). vLLM's `prompt_logprobs` adds the prompt's logprobs to each choice in vLLM's
shape. The engine sends a prompt's logprobs once, in its request's first delta; a choice of
another completion of the same prompt may open later, so they are kept per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.cluster.openai_logprobs import (
    TokenTexts,
    completion_logprobs,
    vllm_prompt_logprobs,
)
from pagedserve.cluster.openai_requests import CompletionRequest
from pagedserve.outputs import RequestOutput


@dataclass
class ShownPrompt:
    """One prompt of a completions request as its choices show it."""

    text: str  # what `echo` puts before the completion's text
    token_ids: list[int]


def shown_prompts(request: CompletionRequest, prompts: list[str | list[int]],
                  token_ids: list[list[int]], tokenizer) -> list[ShownPrompt] | None:
    """The request's prompts (text, or token ids decoded) when its choices show them, else None."""
    if not request.echo and request.prompt_logprobs is None:
        return None
    return [ShownPrompt(p if isinstance(p, str) else tokenizer.decode(ids), ids)
            for p, ids in zip(prompts, token_ids, strict=True)]


def shown_prompt_key(request) -> dict | None:
    """What a request's response shows of its prompts beyond its sampling parameters, for the
    response cache's key: echo's prompt texts (two texts may encode alike), and whether vLLM's
    `prompt_logprobs` field asked (echo with logprobs asks the engine the same)."""
    if not isinstance(request, CompletionRequest):
        return None
    if not request.echo and request.prompt_logprobs is None:
        return None
    return {"echo": request.prompt if request.echo else None,
            "prompt_logprobs": request.prompt_logprobs}


class PromptEcho:
    """The first piece of each completions choice: its prompt's text (`echo`) and logprobs.

    Choice `i` belongs to prompt `i // n`. `logprobs`: the request's count, shown for echoed
    prompt tokens too; `prompt_logprobs`: vLLM's field, shown as `choice.prompt_logprobs`.
    """

    def __init__(self, prompts: list[ShownPrompt], n: int, echo: bool, logprobs: int | None,
                 prompt_logprobs: int | None, texts: TokenTexts) -> None:
        self.prompts, self.n, self.echo = prompts, n, echo
        self.logprobs, self.prompt_logprobs, self.texts = logprobs, prompt_logprobs, texts
        self._scored: dict[int, list] = {}  # prompt index -> its engine prompt logprobs

    @classmethod
    def for_request(cls, request: CompletionRequest, tokenizer,
                    prompts: list[ShownPrompt] | None) -> PromptEcho | None:
        """The request's echo, or None when its choices show nothing of the prompts."""
        if prompts is None:
            return None
        return cls(prompts, request.n, bool(request.echo), request.logprobs,
                   request.prompt_logprobs, TokenTexts(tokenizer))

    def record(self, delta: RequestOutput, choice_offset: int) -> None:
        if delta.prompt_logprobs is not None:
            self._scored[choice_offset // self.n] = delta.prompt_logprobs

    def piece(self, index: int) -> dict:
        """Choice `index`'s first piece (its text is the prompt's, or empty without echo)."""
        prompt = self.prompts[index // self.n]
        scored = self._scored.get(index // self.n)  # None only if the request was cut off
        piece = {"index": index, "text": prompt.text if self.echo else "", "logprobs": None,
                 "finish_reason": None}
        if self.echo and self.logprobs is not None and scored is not None:
            piece["logprobs"] = completion_logprobs(prompt.token_ids, scored, self.texts,
                                                    self.logprobs, 0)
        if self.prompt_logprobs is not None:
            piece["prompt_logprobs"] = None if scored is None else vllm_prompt_logprobs(
                prompt.token_ids, scored, self.texts, self.prompt_logprobs)
        return piece
