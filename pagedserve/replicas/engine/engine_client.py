"""The one client of an engine process (`engine_core`): add, abort, stats, per-request deltas.

A server uses it so that its event loop and threads never compete with the engine's steps for a
GIL. A reader thread receives the engine's messages and hands outputs to the asyncio streams; a
stream tells the engine it wants news only when its consumer is waiting, so a busy server gets
fewer deltas carrying more tokens and the engine never builds outputs nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Client

from pagedserve.config import EngineConfig
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.engine_core import run_engine_core
from pagedserve.replicas.engine.engine_stats import EngineStats
from pagedserve.replicas.engine.spawn_main import without_parent_main
from pagedserve.sampling_params import SamplingParams

START_TIMEOUT_S = 1800.0  # a large model's first load converts and profiles
ALIVE_CHECK_S = 0.5  # while waiting for the engine, check this often that it still runs


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; the replica must be replaced."""


class Stream:
    """One request's mailbox; `wanting` says its consumer waits for news from the engine."""

    __slots__ = ("loop", "queue", "wanting", "want_after")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.wanting = True  # an add counts as a "want"
        self.want_after = 0.0  # loop time before which this stream asks for no more news


class EngineClient:
    """An engine in a process of its own; `add_request` gives an async iterator of deltas.

    The engine process is spawned here, or a claimed standby engine process of the node is
    adopted (`standby`). Leaving a stream early (or cancelling it) aborts its request.

    `max_deltas_per_s` bounds the deltas all streams together receive per second (None: no
    bound): each stream then waits `number of streams / max_deltas_per_s` seconds between two
    deltas, and the tokens of that time arrive together. Delivering a delta costs its caller a
    fixed amount of work per hop (serialization, a Ray item, an SSE event), so this keeps that
    work bounded however many streams run, while a lone stream still gets every token at once.
    The first delta and the final one are never held back.
    """

    def __init__(self, config: EngineConfig, torch_threads: int | None = None,
                 max_deltas_per_s: float | None = None, init_method: str | None = None,
                 shared_weights=None, standby: dict | None = None,
                 gpu_ids: list[int] | None = None,
                 rank_failure: Callable[[], str | None] | None = None) -> None:
        """`init_method`: where the other tensor-parallel ranks wait for this engine (rank 0);
        `rank_failure`: says which of those ranks died (else None), checked while the engine
        starts; `shared_weights`: a `SharedWeights` to load instead of the model's files;
        `standby`: a claimed standby engine process (`StandbyPool.claim`) to adopt instead of
        spawning one; `gpu_ids`: this replica's GPUs, which an adopted standby selects."""
        if max_deltas_per_s is not None and max_deltas_per_s <= 0:
            raise ValueError(f"max_deltas_per_s must be positive, got {max_deltas_per_s}")
        self.max_deltas_per_s = max_deltas_per_s
        self._streams: dict[str, Stream] = {}
        self._ids = itertools.count()
        self._error: object | None = None
        started = time.perf_counter()
        if standby is not None:
            self._conn = Client(standby["address"], family="AF_UNIX", authkey=standby["authkey"])
            self._process = AdoptedProcess(standby["pid"])
            self._conn.send(("adopt", config.model_dump(), torch_threads, init_method,
                             list(gpu_ids or []), shared_weights))
        else:
            ctx = multiprocessing.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._process = ctx.Process(
                target=run_engine_core, name="pagedserve-engine-core", daemon=True,
                args=(config.model_dump(), child, torch_threads, init_method, shared_weights))
            with without_parent_main():  # the child needs nothing from the parent's script
                self._process.start()
            child.close()
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stats, phases = self._wait_ready(rank_failure)
        total = time.perf_counter() - started
        # What the engine did not time itself: spawning the process, pipes, unpickling. An
        # adopted standby's imports and preload happened before (reported, not counted here).
        own = {k: v for k, v in phases.items() if not k.startswith("standby_")}
        self.startup_phases = {"engine_process": max(0.0, total - sum(own.values())), **own}
        self.standby_phases = {k: v for k, v in phases.items() if k.startswith("standby_")}
        self.pid = self._process.pid
        self._reader = threading.Thread(target=self._read, name="pagedserve-engine-reader",
                                        daemon=True)
        self._reader.start()

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine stopped on an error."""
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error}")

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request (ValueError on bad input) and return its delta stream.

        Each item holds only what is new since the previous one, as the engine sent it: new
        text, token ids and logprobs per completion index, a completion's finish reason once,
        the prompt logprobs (when asked for) once.
        Items leave out the prompt (`prompt=None`, `prompt_token_ids=[]`): the caller has it.
        Leaving the iterator early (or cancelling) aborts the request.
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
        finished = False
        try:
            while not finished:
                item = merge_queued(stream.queue, await self._next_item(request_id, stream))
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
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

    def stats_nowait(self) -> EngineStats:
        """The counters the engine sent with its last step (or command)."""
        return self._stats

    async def shutdown(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # it may be exiting already
                self._send(("stop",))
            await asyncio.get_running_loop().run_in_executor(None, self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()

    def fail(self, message: str) -> None:
        """Stop the engine now (e.g. a tensor-parallel rank died): every stream and command
        gets an EngineDeadError, and the process is killed rather than left waiting on a
        collective that will never complete."""
        self._fail(message)
        if self._process.is_alive():
            self._process.kill()

    def _notify_want(self, request_id: str) -> None:
        """Tell the engine this request's consumer waits for news."""
        self._send(("want", request_id))

    async def _command(self, kind: str, *args):
        self.check_health()
        loop = asyncio.get_running_loop()
        command_id = next(self._ids)
        future = loop.create_future()
        self._pending[command_id] = (loop, future)
        self._send((kind, command_id, *args))
        try:
            return await future
        finally:
            self._pending.pop(command_id, None)

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _wait_ready(self, rank_failure: Callable[[], str | None] | None,
                    ) -> tuple[EngineStats, dict[str, float]]:
        """The engine's ready message (counters, start-up phases); raises if it (or a rank)
        dies, fails or takes too long first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._conn.poll(ALIVE_CHECK_S):
            if rank_failure is not None and (failure := rank_failure()) is not None:
                self._process.kill()  # rank 0 would wait at the rendezvous for the dead rank
                raise RuntimeError(f"the engine could not start: {failure}")
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while starting (exit code "
                                   f"{self._process.exitcode})")
            if time.monotonic() > deadline:
                self._process.kill()
                raise RuntimeError(f"the engine process did not start in {START_TIMEOUT_S:.0f} s")
        try:
            kind, value, *phases = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while starting (exit code "
                               f"{self._process.exitcode})") from None
        if kind != "ready":
            self._process.join(5)
            raise RuntimeError(value)
        return value, phases[0]

    def _read(self) -> None:
        """Reader thread: dispatch every message from the engine process until it ends."""
        try:
            while True:
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._fail("the engine process exited")

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "outputs":
            self._stats = msg[2]
            for wire in msg[1]:
                self._deliver_wire(wire)
        elif kind == "result":
            _, command_id, ok, value, self._stats = msg
            entry = self._pending.get(command_id)
            if entry is not None:
                loop, future = entry
                loop.call_soon_threadsafe(settle, future, value if ok else None,
                                          None if ok else value)
        elif kind == "dead":
            self._fail(msg[1])

    def _deliver_wire(self, wire: tuple) -> None:
        if wire[0] in self._streams:  # else aborted meanwhile
            self._deliver(decode_delta(wire))

    def _fail(self, message: str) -> None:
        if self._error is not None:
            return
        self._error = message
        dead = EngineDeadError(f"engine stopped: {message}")
        self._fail_streams(dead)
        for loop, future in list(self._pending.values()):
            loop.call_soon_threadsafe(settle, future, None, dead)


def settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """Complete `future` on its loop's thread, unless its caller was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def merge_queued(queue: asyncio.Queue, item):
    """`item` joined with the deltas queued behind it (an error ends the stream: it wins).

    A consumer slower than the engine (a remote caller, say) then gets fewer, larger deltas
    instead of falling behind one step at a time.
    """
    while not isinstance(item, BaseException) and not queue.empty():
        later = queue.get_nowait()
        item = later if isinstance(later, BaseException) else merge_deltas(item, later)
    return item


def merge_deltas(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One delta holding what `first` and then `second` brought."""
    by_index = {c.index: c for c in first.outputs}
    for c in second.outputs:
        old = by_index.get(c.index)
        by_index[c.index] = c if old is None else CompletionOutput(
            index=c.index, text=old.text + c.text, token_ids=old.token_ids + c.token_ids,
            cumulative_logprob=c.cumulative_logprob,
            logprobs=old.logprobs + c.logprobs if c.logprobs is not None else None,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
    return RequestOutput(first.request_id, None, [], sorted(by_index.values(),
                         key=lambda c: c.index), second.finished, second.num_cached_tokens,
                         first.prompt_logprobs or second.prompt_logprobs)


def decode_delta(wire: tuple) -> RequestOutput:
    """Rebuild a delta `RequestOutput` from `engine_core.encode_delta`'s tuple."""
    request_id, completions, finished, num_cached_tokens, prompt_logprobs = wire
    outputs = [CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
                                finish_reason, stop_reason)
               for index, text, token_ids, cumulative_logprob, logprobs, finish_reason,
               stop_reason in completions]
    return RequestOutput(request_id, None, [], outputs, finished, num_cached_tokens,
                         prompt_logprobs)


class AdoptedProcess:
    """An engine process this replica adopted (a standby's): not our child, known by pid.

    Its parent (the node's standby pool) reaps it; a zombie counts as exited.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode = None

    def is_alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
