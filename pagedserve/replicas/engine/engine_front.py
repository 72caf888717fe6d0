"""What the two asyncio fronts of the engine share: request streams, add, abort, deltas.

`AsyncEngine` steps the engine on a thread of this process, `ProcessEngine` in a child process;
both only differ in how a command reaches the engine (`_command`) and in how a waiting consumer
tells the engine it wants news (`_notify_want`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.engine_stats import EngineStats
from pagedserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the replica must be replaced."""


class Stream:
    """One request's mailbox; `wanting` says its consumer waits for news from the engine."""

    __slots__ = ("loop", "queue", "wanting", "want_after", "prompt")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.wanting = True  # an add counts as a "want"
        self.want_after = 0.0  # loop time before which this stream asks for no more news
        self.prompt: tuple = (None, [])  # (text, token ids), for fronts that receive it once


class EngineFront:
    """`add_request` gives an async iterator of output deltas; leaving it early aborts.

    `max_deltas_per_s` bounds the deltas all streams together receive per second (None: no
    bound): each stream then waits `number of streams / max_deltas_per_s` seconds between two
    deltas, and the tokens of that time arrive together. Delivering a delta costs its caller a
    fixed amount of work per hop (serialization, a Ray item, an SSE event), so this keeps that
    work bounded however many streams run, while a lone stream still gets every token at once.
    The first delta and the final one are never held back.

    Subclasses set `_error` when the engine dies, put an `EngineDeadError` into every stream,
    and implement `_command(kind, *args)` for kinds "add", "abort", "stats" and "hashes".
    """

    def __init__(self, max_deltas_per_s: float | None = None) -> None:
        if max_deltas_per_s is not None and max_deltas_per_s <= 0:
            raise ValueError(f"max_deltas_per_s must be positive, got {max_deltas_per_s}")
        self.max_deltas_per_s = max_deltas_per_s
        self._streams: dict[str, Stream] = {}
        self._ids = itertools.count()
        self._error: object | None = None

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine stopped on an error."""
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error}")

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request (ValueError on bad input) and return its delta stream.

        Each item holds only what is new since the previous one: new text and token ids per
        completion index. Leaving the iterator early (or cancelling) aborts the request.
        """
        self.check_health()
        request_id = request_id or f"req-{next(self._ids)}"
        stream = Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        try:
            await self._command("add", request_id, prompt, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return self._iterate(request_id, stream)

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self._error is None:
            await self._command("abort", request_id)

    async def stats(self) -> EngineStats:
        return await self._command("stats")

    async def cached_block_hashes(self) -> set[int]:
        """Hashes of the prefix blocks the engine can reuse (read between steps)."""
        return await self._command("hashes")

    async def _command(self, kind: str, *args):
        raise NotImplementedError

    def _notify_want(self, request_id: str) -> None:
        """Tell the engine this request's consumer waits (the flag alone may be enough)."""

    def _deliver(self, out: RequestOutput) -> None:
        """Hand one engine output to its stream; call from any thread."""
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.wanting = False
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_streams(self, dead: EngineDeadError) -> None:
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)

    async def _iterate(self, request_id: str, stream: Stream) -> AsyncIterator[RequestOutput]:
        seen: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                item = latest(stream.queue, await self._next_item(request_id, stream))
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield delta(item, seen)
                stream.want_after = stream.loop.time() + self._delta_interval()
        finally:
            if not finished:
                await asyncio.shield(self.abort(request_id))
            self._streams.pop(request_id, None)

    async def _next_item(self, request_id: str, stream: Stream):
        """The stream's next queued item; ask the engine for news once the interval is over.

        While the stream waits out its interval only a final output or an error can arrive
        (the engine sends those unasked), and either ends the wait at once.
        """
        if stream.queue.empty() and not stream.wanting:
            wait = stream.want_after - stream.loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(stream.queue.get(), wait)
            if stream.queue.empty():
                stream.wanting = True
                self._notify_want(request_id)
        return await stream.queue.get()

    def _delta_interval(self) -> float:
        if self.max_deltas_per_s is None:
            return 0.0
        return len(self._streams) / self.max_deltas_per_s


def settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """Complete `future` on its loop's thread, unless its caller was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def latest(queue: asyncio.Queue, item):
    """Skip to the newest queued item: outputs are cumulative, so it holds the others' news.

    A consumer slower than the engine (a remote caller, say) then gets fewer, larger deltas
    instead of falling behind one step at a time.
    """
    while not isinstance(item, BaseException) and not queue.empty():
        item = queue.get_nowait()
    return item


def delta(out: RequestOutput, seen: dict[int, tuple[int, int]]) -> RequestOutput:
    """Keep only what each completion gained since the last item of this stream."""
    deltas = []
    for c in out.outputs:
        text_len, tok_len = seen.get(c.index, (0, 0))
        if len(c.text) == text_len and len(c.token_ids) == tok_len and c.finish_reason is None:
            continue
        seen[c.index] = (len(c.text), len(c.token_ids))
        deltas.append(CompletionOutput(
            index=c.index, text=c.text[text_len:], token_ids=c.token_ids[tok_len:],
            cumulative_logprob=c.cumulative_logprob,
            logprobs=c.logprobs[tok_len:] if c.logprobs is not None else None,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
        ))
    return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, deltas, out.finished,
                         out.num_cached_tokens)
