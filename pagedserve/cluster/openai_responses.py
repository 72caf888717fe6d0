"""Unary OpenAI responses (`chat.completion`, `text_completion`) and the `/v1/models` payload.

The unary builders fold the very chunks the streams produce, so a streamed response
concatenates to exactly the unary one.
"""

from __future__ import annotations

from pagedserve.cluster.openai_echo import PromptEcho, ShownPrompt
from pagedserve.cluster.openai_requests import ChatCompletionRequest, CompletionRequest
from pagedserve.cluster.openai_sampling import request_logprobs
from pagedserve.cluster.openai_streams import ChatStream, CompletionStream
from pagedserve.outputs import RequestOutput


class _ResponseBuilder:
    """Feeds deltas through a stream and merges its chunks, choice by choice."""

    object_name = ""

    def __init__(self, stream: ChatStream | CompletionStream) -> None:
        self.stream = stream
        self._choices: dict[int, dict] = {}

    def add(self, delta: RequestOutput, choice_offset: int = 0) -> None:
        """Take one engine delta (`choice_offset = prompt_index * n` for completions)."""
        for chunk in self.stream.on_delta(delta, choice_offset):
            self.add_chunk(chunk)

    def add_chunk(self, chunk: dict) -> None:
        """Merge one streamed chunk (as `on_delta` makes them) into the choices."""
        for piece in chunk["choices"]:
            index = piece["index"]
            if index not in self._choices:
                self._choices[index] = self._new_choice(index)
            choice = self._choices[index]
            self._merge(choice, piece)
            if piece["finish_reason"] is not None:
                choice["finish_reason"] = piece["finish_reason"]
                choice["stop_reason"] = piece["stop_reason"]

    def response(self, prompt_tokens: int) -> dict:
        """The unary response; call once every choice has finished.

        `prompt_tokens` counts each prompt once (summed over a completions request's prompts).
        """
        return {"id": self.stream.id, "object": self.object_name,
                "created": self.stream.created, "model": self.stream.model,
                "choices": [self._choices[i] for i in sorted(self._choices)],
                "usage": self.stream.usage(prompt_tokens)}

    def _new_choice(self, index: int) -> dict:
        raise NotImplementedError

    def _merge(self, choice: dict, piece: dict) -> None:
        raise NotImplementedError


class ChatResponseBuilder(_ResponseBuilder):
    """Collects one chat request's deltas into a `chat.completion` object."""

    object_name = "chat.completion"

    def __init__(self, request_id: str, model: str, created: int, *, tokenizer=None,
                 top_logprobs: int | None = None) -> None:
        super().__init__(ChatStream(request_id, model, created, tokenizer=tokenizer,
                                    top_logprobs=top_logprobs))

    @classmethod
    def for_request(cls, request: ChatCompletionRequest, request_id: str, model: str,
                    created: int, tokenizer=None) -> ChatResponseBuilder:
        return cls(request_id, model, created, tokenizer=tokenizer,
                   top_logprobs=request_logprobs(request))

    def _new_choice(self, index: int) -> dict:
        logprobs = {"content": []} if self.stream.logprobs is not None else None
        return {"index": index, "message": {"role": "assistant", "content": ""},
                "logprobs": logprobs, "finish_reason": None, "stop_reason": None}

    def _merge(self, choice: dict, piece: dict) -> None:
        choice["message"]["content"] += piece["delta"].get("content", "")
        if piece["logprobs"] is not None:
            choice["logprobs"]["content"] += piece["logprobs"]["content"]


class CompletionResponseBuilder(_ResponseBuilder):
    """Collects a completions request's deltas (every prompt's) into a `text_completion`."""

    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, created: int, *, tokenizer=None,
                 logprobs: int | None = None, prompt_echo: PromptEcho | None = None) -> None:
        super().__init__(CompletionStream(request_id, model, created, tokenizer=tokenizer,
                                          logprobs=logprobs, prompt_echo=prompt_echo))

    @classmethod
    def for_request(cls, request: CompletionRequest, request_id: str, model: str,
                    created: int, tokenizer=None,
                    prompts: list[ShownPrompt] | None = None) -> CompletionResponseBuilder:
        return cls(request_id, model, created, tokenizer=tokenizer,
                   logprobs=request_logprobs(request),
                   prompt_echo=PromptEcho.for_request(request, tokenizer, prompts))

    def _new_choice(self, index: int) -> dict:
        logprobs = None
        if self.stream.logprobs is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                        "text_offset": []}
        return {"index": index, "text": "", "logprobs": logprobs, "finish_reason": None,
                "stop_reason": None}

    def _merge(self, choice: dict, piece: dict) -> None:
        choice["text"] += piece["text"]
        if piece["logprobs"] is not None:
            for key, values in piece["logprobs"].items():
                choice["logprobs"][key] += values
        if "prompt_logprobs" in piece:  # vLLM's field: only a choice's first piece has it
            choice["prompt_logprobs"] = piece["prompt_logprobs"]


def models_list(model_ids: list[str], created: int) -> dict:
    """The `GET /v1/models` payload."""
    return {"object": "list",
            "data": [{"id": model_id, "object": "model", "created": created,
                      "owned_by": "pagedserve"} for model_id in model_ids]}
