"""Engine deltas → OpenAI streaming chunks (`chat.completion.chunk`, streamed `text_completion`).

One stream object per HTTP request. Feed it every `RequestOutput` delta the engine yields (for a
completions request with several prompts, each prompt's deltas with `choice_offset = prompt_index
* n`), send what `on_delta` returns, then what `finish` returns, then `SSE_DONE`.

Chunks per choice: an opening chunk (chat: `delta.role = "assistant"`; completions with `echo`:
the prompt's text and logprobs), one chunk per delta that brought text (or, with logprobs,
tokens), and a closing chunk with an empty delta and `finish_reason`.
The engine's `abort` (the request was cut off before a natural end) is reported as `"length"`,
the value OpenAI clients already read as "truncated"; OpenAI's schema has no abort reason.
"""

from __future__ import annotations

from pagedserve.cluster.openai_echo import PromptEcho, ShownPrompt
from pagedserve.cluster.openai_logprobs import (
    TokenTexts,
    chat_logprobs_content,
    completion_logprobs,
)
from pagedserve.cluster.openai_requests import ChatCompletionRequest, CompletionRequest
from pagedserve.cluster.openai_sampling import request_logprobs
from pagedserve.outputs import CompletionOutput, RequestOutput

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "length"}


def openai_finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _ChunkStream:
    """What chat and completions streams share: ids, token counting, usage, chunk envelope."""

    object_name = ""
    id_prefix = ""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool,
                 tokenizer, logprobs: int | None) -> None:
        self.id = f"{self.id_prefix}{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.completion_tokens = 0
        self.aborted = False  # some choice was cut off by the engine (never cached)
        self._texts = TokenTexts(tokenizer) if logprobs is not None else None
        self._opened: set[int] = set()

    def on_delta(self, delta: RequestOutput, choice_offset: int = 0) -> list[dict]:
        """The chunks to send for one engine delta (possibly none)."""
        chunks = []
        for out in delta.outputs:
            index = choice_offset + out.index
            self.completion_tokens += len(out.token_ids)
            if index not in self._opened:
                self._opened.add(index)
                chunks += [self._chunk(choice) for choice in self._opening(index)]
            if out.text or (out.token_ids and self._wants_logprobs(out)):
                chunks.append(self._chunk(self._content(index, out)))
            if out.finish_reason is not None:
                self.aborted = self.aborted or out.finish_reason == "abort"
                chunks.append(self._chunk(self._closing(index, out)))
        return chunks

    def finish(self, prompt_tokens: int) -> list[dict]:
        """The chunks after the last delta: the usage chunk when `include_usage`, else none.

        `prompt_tokens` counts each prompt once (not once per choice), as OpenAI does.
        """
        if not self.include_usage:
            return []
        return [{**self._chunk(None), "usage": self.usage(prompt_tokens)}]

    def usage(self, prompt_tokens: int) -> dict:
        return usage(prompt_tokens, self.completion_tokens)

    def _chunk(self, choice: dict | None) -> dict:
        chunk = {"id": self.id, "object": self.object_name, "created": self.created,
                 "model": self.model, "choices": [] if choice is None else [choice]}
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends an explicit null until the usage chunk
        return chunk

    def _opening(self, index: int) -> list[dict]:
        return []

    def _content(self, index: int, out: CompletionOutput) -> dict:
        raise NotImplementedError

    def _closing(self, index: int, out: CompletionOutput) -> dict:
        raise NotImplementedError

    def _wants_logprobs(self, out: CompletionOutput) -> bool:
        return self._texts is not None and out.logprobs is not None


class ChatStream(_ChunkStream):
    """`chat.completion.chunk` objects for one chat request; `top_logprobs=None`: no logprobs."""

    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, request_id: str, model: str, created: int, *, include_usage: bool = False,
                 tokenizer=None, top_logprobs: int | None = None) -> None:
        super().__init__(request_id, model, created, include_usage, tokenizer, top_logprobs)

    @classmethod
    def for_request(cls, request: ChatCompletionRequest, request_id: str, model: str,
                    created: int, tokenizer=None) -> ChatStream:
        return cls(request_id, model, created, include_usage=request.include_usage,
                   tokenizer=tokenizer, top_logprobs=request_logprobs(request))

    def _opening(self, index: int) -> list[dict]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]

    def _content(self, index: int, out: CompletionOutput) -> dict:
        logprobs = None
        if self._wants_logprobs(out):
            logprobs = {"content": chat_logprobs_content(out.token_ids, out.logprobs,
                                                         self._texts, self.logprobs)}
        return {"index": index, "delta": {"content": out.text}, "logprobs": logprobs,
                "finish_reason": None}

    def _closing(self, index: int, out: CompletionOutput) -> dict:
        return {"index": index, "delta": {}, "logprobs": None,
                "finish_reason": openai_finish_reason(out.finish_reason),
                "stop_reason": out.stop_reason}


class CompletionStream(_ChunkStream):
    """Streamed `text_completion` objects for one completions request (all its prompts)."""

    object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, request_id: str, model: str, created: int, *, include_usage: bool = False,
                 tokenizer=None, logprobs: int | None = None,
                 prompt_echo: PromptEcho | None = None) -> None:
        super().__init__(request_id, model, created, include_usage, tokenizer, logprobs)
        self._text_len: dict[int, int] = {}
        self.prompt_echo = prompt_echo

    @classmethod
    def for_request(cls, request: CompletionRequest, request_id: str, model: str,
                    created: int, tokenizer=None,
                    prompts: list[ShownPrompt] | None = None) -> CompletionStream:
        """`prompts`: what the choices show of their prompts (`shown_prompts`), if anything."""
        return cls(request_id, model, created, include_usage=request.include_usage,
                   tokenizer=tokenizer, logprobs=request_logprobs(request),
                   prompt_echo=PromptEcho.for_request(request, tokenizer, prompts))

    def on_delta(self, delta: RequestOutput, choice_offset: int = 0) -> list[dict]:
        if self.prompt_echo is not None:
            self.prompt_echo.record(delta, choice_offset)
        return super().on_delta(delta, choice_offset)

    def _opening(self, index: int) -> list[dict]:
        if self.prompt_echo is None:
            return []
        piece = self.prompt_echo.piece(index)
        self._text_len[index] = len(piece["text"])  # generated tokens' offsets follow it
        return [piece]

    def _content(self, index: int, out: CompletionOutput) -> dict:
        offset = self._text_len.get(index, 0)
        self._text_len[index] = offset + len(out.text)
        logprobs = None
        if self._wants_logprobs(out):
            logprobs = completion_logprobs(out.token_ids, out.logprobs, self._texts,
                                           self.logprobs, offset)
        return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": None}

    def _closing(self, index: int, out: CompletionOutput) -> dict:
        return {"index": index, "text": "", "logprobs": None,
                "finish_reason": openai_finish_reason(out.finish_reason),
                "stop_reason": out.stop_reason}
