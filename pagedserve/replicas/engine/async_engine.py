"""asyncio front of the engine: `add_request` gives an async iterator of output deltas."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from pagedserve.config import EngineConfig
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.llm_engine import EngineStats, LLMEngine
from pagedserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the replica must be replaced."""


class _Stream:
    """One request's mailbox; `hungry` tells the engine thread its consumer waits for news."""

    __slots__ = ("loop", "queue", "hungry")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.hungry = True


class AsyncEngine:
    """Steps `LLMEngine` on its own thread and fans results out to asyncio streams.

    One thread owns the engine and its tokenizer: it runs adds, aborts and reads between steps
    and otherwise steps back to back, never waiting for the event loop. Outputs are built only
    for streams whose consumer is waiting (or that finished), so a consumer slower than the
    engine gets fewer deltas carrying more tokens, and the engine does no work for nobody.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._work = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> AsyncEngine:
        return cls(LLMEngine(config, progress=progress))

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine loop stopped on an error."""
        self._raise_if_dead()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request (ValueError on bad input) and return its delta stream.

        Each item holds only what is new since the previous one: new text and token ids per
        completion index. Leaving the iterator early (or cancelling) aborts the request.
        """
        self._raise_if_dead()
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        try:
            await self._run(self.engine.add_request, request_id, prompt, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return self._iterate(request_id, stream)

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self._error is None:
            await self._run(self.engine.abort, request_id)

    async def stats(self) -> EngineStats:
        return await self._run(self.engine.stats)

    def stats_nowait(self) -> EngineStats:
        """A snapshot read from the event loop without waiting for a running step.

        It reads only counters and lengths, so it is consistent enough for routing decisions.
        """
        return self.engine.stats()

    async def cached_block_hashes(self) -> set[int]:
        """Hashes of the prefix blocks the engine can reuse (read between steps)."""
        return await self._run(self.engine.block_manager.cached_block_hashes)

    async def shutdown(self) -> None:
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        seen: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                stream.hungry = True
                item = _latest(stream.queue, await stream.queue.get())
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine stopped: {item!r}") from item
                finished = item.finished
                yield _delta(item, seen)
        finally:
            if not finished:
                await asyncio.shield(self.abort(request_id))
            self._streams.pop(request_id, None)

    # The engine thread.

    def _engine_thread(self) -> None:
        while not self._stopping:
            self._run_commands()
            if not self.engine.has_unfinished_requests():
                self._work.wait()
                self._work.clear()
                continue
            try:
                outputs = self.engine.step(stream=self._wants_output)
            except BaseException as err:  # the engine is broken: fail every stream and call
                self._fail(err)
                return
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.hungry = False
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _wants_output(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        return stream is not None and stream.hungry

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, loop, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(*args)
            except BaseException as err:
                loop.call_soon_threadsafe(_settle, future, None, err)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    def _fail(self, err: BaseException) -> None:
        self._error = err
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
        dead = EngineDeadError(f"engine stopped: {err!r}")
        while True:
            try:
                _, _, loop, future = self._commands.get_nowait()
            except queue.Empty:
                return
            loop.call_soon_threadsafe(_settle, future, None, dead)

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")

    async def _run(self, fn, *args):
        """Run `fn(*args)` on the engine thread between two steps and return its result."""
        self._raise_if_dead()
        if self._thread is None:
            self._thread = threading.Thread(target=self._engine_thread, daemon=True,
                                            name="pagedserve-engine")
            self._thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((fn, args, loop, future))
        self._work.set()
        return await future


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _latest(queue: asyncio.Queue, item):
    """Skip to the newest queued item: outputs are cumulative, so it holds the others' news.

    A consumer slower than the engine (a remote caller, say) then gets fewer, larger deltas
    instead of falling behind one step at a time.
    """
    while not isinstance(item, BaseException) and not queue.empty():
        item = queue.get_nowait()
    return item


def _delta(out: RequestOutput, seen: dict[int, tuple[int, int]]) -> RequestOutput:
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
