"""asyncio front of the engine: `add_request` gives an async iterator of output deltas."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from pagedserve.config import EngineConfig
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.llm_engine import EngineStats, LLMEngine
from pagedserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the replica must be replaced."""


class AsyncEngine:
    """Runs `LLMEngine.step` in a loop off the event loop and fans results out to streams.

    Every touch of the engine (add, step, abort) runs on one worker thread, so the engine and its
    tokenizer are never used concurrently; the event loop stays free for I/O meanwhile.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedserve-engine")
        self._streams: dict[str, asyncio.Queue] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
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
        return self._loop_task is not None and not self._loop_task.done() and self._error is None

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request (ValueError on bad input) and return its delta stream.

        Each item holds only what is new since the previous one: new text and token ids per
        completion index. Leaving the iterator early (or cancelling) aborts the request.
        """
        self._raise_if_dead()
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            await self._run(self.engine.add_request, request_id, prompt, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._ensure_loop()
        self._wakeup.set()
        return self._stream(request_id, queue)

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
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        seen: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                item = _latest(queue, await queue.get())
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine stopped: {item!r}") from item
                finished = item.finished
                yield _delta(item, seen)
        finally:
            if not finished:
                await asyncio.shield(self.abort(request_id))
            self._streams.pop(request_id, None)

    async def _engine_loop(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                for out in await self._run(self.engine.step):
                    queue = self._streams.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                await asyncio.sleep(0)  # let streams and new requests in between steps
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the engine is broken: fail every stream, refuse new work
            self._error = err
            for queue in self._streams.values():
                queue.put_nowait(err)
            raise

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._engine_loop())

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


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
