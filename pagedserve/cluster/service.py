"""The OpenAI endpoints' logic, shared by HTTP and Python handle callers.

Validation, the chat template and tokenization happen here, before anything is queued, so a bad
request never reaches a replica. Each prompt becomes one engine job; its deltas are turned into
OpenAI chunks, or gathered into one response for unary calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass

from pagedserve.cluster.dispatch import Dispatcher, Job, merge_streams
from pagedserve.cluster.metrics import IngressMetrics
from pagedserve.cluster.openai_echo import shown_prompts
from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.openai_prompts import completion_prompts, render_chat
from pagedserve.cluster.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
)
from pagedserve.cluster.openai_responses import ChatResponseBuilder, CompletionResponseBuilder
from pagedserve.cluster.openai_sampling import structured_param, to_sampling_params
from pagedserve.cluster.openai_streams import ChatStream, CompletionStream
from pagedserve.cluster.openai_tools import streamed_tool_calls, tool_mode, with_tool_calls
from pagedserve.cluster.request_body import unicode_fault
from pagedserve.config import ClusterConfig
from pagedserve.replicas.models.default_model import DEFAULT_MODEL_NAME
from pagedserve.replicas.models.model_files import load_model_files

CHAT, COMPLETIONS = "chat", "completions"  # the `endpoint` tag of request metrics


@dataclass
class ModelInfo:
    """What the ingress knows of the served model without loading its weights."""

    name: str
    tokenizer: object
    max_model_len: int
    vocab_size: int


def load_model_info(config: ClusterConfig) -> ModelInfo:
    """Tokenizer and limits of the served model, read without loading its weights."""
    files = load_model_files(config.engine.model, progress=False)
    spec = files.spec
    limits = [spec.max_position_embeddings]
    if spec.sliding_window is not None:
        limits.append(spec.sliding_window)
    if config.engine.max_model_len is not None:
        limits.append(config.engine.max_model_len)
    name = config.served_model_name or (
        DEFAULT_MODEL_NAME if config.engine.model is None else files.model_dir.name)
    return ModelInfo(name=name, tokenizer=files.tokenizer, max_model_len=min(limits),
                     vocab_size=spec.vocab_size)


@dataclass
class Prepared:
    """A validated, tokenized request, ready to be answered (generated, or from a cache).

    `output` is the chunk stream (`stream: true`) or the response builder that generation
    feeds; `output_args` are what built it: (request, request_id, model, created, tokenizer),
    and for completions what the choices show of the prompts (`shown_prompts`).
    """

    endpoint: str  # CHAT or COMPLETIONS (also the `endpoint` tag of its metrics)
    request: ChatCompletionRequest | CompletionRequest
    jobs: list[Job]
    output_args: tuple
    output: ChatStream | CompletionStream | ChatResponseBuilder | CompletionResponseBuilder = None

    def __post_init__(self) -> None:
        if self.output is None:
            chat = self.endpoint == CHAT
            if self.request.stream:
                kind = ChatStream if chat else CompletionStream
            else:
                kind = ChatResponseBuilder if chat else CompletionResponseBuilder
            self.output = kind.for_request(*self.output_args)

    @property
    def prompt_tokens(self) -> int:
        return _prompt_tokens(self.jobs)


class OpenAIService:
    """`chat_completions` / `completions`: a response dict, or an async iterator of chunks."""

    def __init__(self, config: ClusterConfig, model: ModelInfo, dispatcher: Dispatcher,
                 metrics: IngressMetrics) -> None:
        self.config = config
        self.model = model
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._grammars = None  # structured outputs: built at the first such request

    async def chat_completions(self, body: object) -> dict | AsyncIterator[dict]:
        prepared = self.prepare_chat(body)
        await self.check_structured(prepared)
        return await self.respond(prepared)

    async def completions(self, body: object) -> dict | AsyncIterator[dict]:
        prepared = self.prepare_completions(body)
        await self.check_structured(prepared)
        return await self.respond(prepared)

    async def check_structured(self, prepared: Prepared) -> None:
        """APIError 400 naming the field when the requested grammar does not compile, so a
        bad schema never reaches a replica. The grammar library (and torch) load on the first
        structured request, in a thread; compiled grammars are cached."""
        spec = prepared.jobs[0].params.structured
        if spec is None:
            return
        with self._counting_errors(prepared.endpoint):
            try:
                await asyncio.to_thread(self._grammar_check, spec)
            except ValueError as err:
                param = structured_param(prepared.request)
                raise APIError.bad_request(f"Invalid '{param}': {err}.", param) from None

    def _grammar_check(self, spec) -> None:
        if self._grammars is None:
            from pagedserve.replicas.engine.structured import Grammars

            self._grammars = Grammars(self.model.tokenizer, self.model.vocab_size)
        self._grammars.matcher(spec)

    def prepare_chat(self, body: object) -> Prepared:
        """Validate and tokenize a chat request (APIError 400 on a bad one)."""
        with self._counting_errors(CHAT):
            request = parse_chat_request(body)
            self._check_model(request.model)
            prompt = render_chat(request, self.model.tokenizer)
            request_id = uuid.uuid4().hex
            jobs = [Job(request_id, prompt, self._params(request, prompt))]
        return Prepared(CHAT, request, jobs, self._output_args(request, request_id))

    def prepare_completions(self, body: object) -> Prepared:
        """Validate and tokenize a completions request (APIError 400 on a bad one)."""
        with self._counting_errors(COMPLETIONS):
            request = parse_completion_request(body)
            self._check_model(request.model)
            request_id = uuid.uuid4().hex
            prompts, jobs = completion_prompts(request), []
            for i, prompt in enumerate(prompts):
                token_ids = self._tokenize(prompt)
                jobs.append(Job(f"{request_id}-{i}", token_ids, self._params(request, token_ids)))
            shown = shown_prompts(request, prompts, [job.prompt_token_ids for job in jobs],
                                  self.model.tokenizer)
        return Prepared(COMPLETIONS, request, jobs,
                        (*self._output_args(request, request_id), shown))

    async def respond(self, prepared: Prepared) -> dict | AsyncIterator[dict]:
        """Generate the answer: a response dict, or (`stream: true`) an iterator of chunks."""
        endpoint, request = prepared.endpoint, prepared.request
        if request.stream:
            chunks = await self._stream(prepared.jobs, prepared.output, endpoint)
            return streamed_tool_calls(chunks, request) if tool_mode(request) else chunks
        response = await self._unary(prepared.jobs, prepared.output, endpoint)
        return with_tool_calls(response, request) if tool_mode(request) else response

    def _output_args(self, request, request_id: str) -> tuple:
        return (request, request_id, self.model.name, int(time.time()), self.model.tokenizer)

    def models(self) -> list[str]:
        return [self.model.name]

    async def _unary(self, jobs: list[Job], builder, endpoint: str) -> dict:
        n = jobs[0].params.n
        async for index, delta in self._deltas(jobs, endpoint):
            builder.add(delta, choice_offset=index * n)
        return builder.response(_prompt_tokens(jobs))

    async def _stream(self, jobs: list[Job], stream, endpoint: str) -> AsyncIterator[dict]:
        deltas = self._deltas(jobs, endpoint)
        first = await anext(deltas)  # admission errors (503) surface before any byte is sent
        return self._chunks(first, deltas, stream, jobs)

    async def _chunks(self, first, deltas, stream, jobs: list[Job]) -> AsyncIterator[dict]:
        n = jobs[0].params.n
        for chunk in stream.on_delta(first[1], choice_offset=first[0] * n):
            yield chunk
        async for index, delta in deltas:
            for chunk in stream.on_delta(delta, choice_offset=index * n):
                yield chunk
        for chunk in stream.finish(_prompt_tokens(jobs)):
            yield chunk

    async def _deltas(self, jobs: list[Job], endpoint: str) -> AsyncIterator[tuple[int, object]]:
        """Every job's deltas as `(job index, delta)`, with latency and status recorded."""
        start = time.monotonic()
        first_token_at = None
        tokens, status = 0, 500
        try:
            async for index, delta in merge_streams([self.dispatcher.stream(j) for j in jobs]):
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.metrics.observe("ttft_s", first_token_at - start)
                tokens += sum(len(out.token_ids) for out in delta.outputs)
                yield index, delta
            status = 200
        except APIError as err:
            status = err.status
            raise
        except (GeneratorExit, asyncio.CancelledError):
            status = 499  # the client went away
            raise
        finally:
            self._record(status, start, first_token_at, tokens, endpoint)

    def _record(self, status: int, start: float, first_token_at: float | None,
                tokens: int, endpoint: str) -> None:
        end = time.monotonic()
        self.metrics.count_request(status, tokens, endpoint)
        if status == 200:
            self.metrics.observe("e2e_s", end - start)
            if first_token_at is not None and tokens > 1:
                self.metrics.observe("tpot_s", (end - first_token_at) / (tokens - 1))

    @contextmanager
    def _counting_errors(self, endpoint: str):
        try:
            yield
        except APIError as err:
            self.metrics.count_request(err.status, endpoint=endpoint)
            raise

    def _params(self, request, prompt_token_ids: list[int]):
        params = to_sampling_params(request, self.model.max_model_len, len(prompt_token_ids))
        outside = [t for t in params.logit_bias or {} if t >= self.model.vocab_size]
        if outside:
            raise APIError.bad_request(
                f"Invalid 'logit_bias': token id {outside[0]} is outside the vocabulary (size "
                f"{self.model.vocab_size}).", "logit_bias")
        limit = self.config.max_tokens_limit
        if limit is not None and params.max_tokens is not None and params.max_tokens > limit:
            raise APIError.bad_request(
                f"max_tokens is {params.max_tokens}; this server allows at most {limit}",
                "max_tokens")
        return params

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = self.model.vocab_size
            bad = [t for t in prompt if t >= vocab]
            if bad:
                raise APIError.bad_request(
                    f"token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt")
            return prompt
        if (fault := unicode_fault(prompt)) is not None:  # from a handle call: HTTP checked it
            raise APIError.bad_request(f"Invalid 'prompt': not valid Unicode ({fault}).",
                                       "prompt")
        token_ids = self.model.tokenizer.encode(prompt)
        if not token_ids:
            raise APIError.bad_request("prompt encodes to no tokens", "prompt")
        return token_ids

    def check_model_name(self, model: object) -> None:
        """APIError 404 unless `model` is absent or the served model's name."""
        if model is not None and not isinstance(model, str):
            raise APIError.bad_request("Invalid 'model': must be a string.", "model")
        self._check_model(model)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model.name:
            raise APIError.model_not_found(model)


def _prompt_tokens(jobs: list[Job]) -> int:
    return sum(len(job.prompt_token_ids) for job in jobs)
