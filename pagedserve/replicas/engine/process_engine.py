"""`AsyncEngine`'s interface over an engine in its own process (see `engine_core`).

A server uses this one: its event loop and threads then never compete with the engine's steps
for a GIL. A reader thread receives the engine's messages and hands outputs to the asyncio
streams; a stream tells the engine it wants news only when its consumer is waiting, so a busy
server gets fewer deltas carrying more tokens and the engine never builds outputs nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import threading
from collections.abc import AsyncIterator

from pagedserve.config import EngineConfig
from pagedserve.outputs import RequestOutput
from pagedserve.replicas.engine.async_engine import EngineDeadError, _delta, _latest, _settle
from pagedserve.replicas.engine.engine_core import run_engine_core
from pagedserve.replicas.engine.llm_engine import EngineStats
from pagedserve.sampling_params import SamplingParams

START_TIMEOUT_S = 1800.0  # a large model's first load converts and profiles


class _Stream:
    __slots__ = ("loop", "queue", "wanting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.wanting = True  # an add counts as a "want"


class ProcessEngine:
    """Same calls as `AsyncEngine`; the engine runs in a child process it owns."""

    def __init__(self, config: EngineConfig, torch_threads: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=run_engine_core, name="pagedserve-engine-core",
                                    args=(config.model_dump(), child, torch_threads), daemon=True)
        self._process.start()
        child.close()
        self._send_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._error: str | None = None
        self._stats = self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="pagedserve-engine-reader",
                                        daemon=True)
        self._reader.start()

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error}")

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request (ValueError on bad input) and return its delta stream."""
        self.check_health()
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        try:
            await self._call("add", request_id, prompt, params)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return self._iterate(request_id, stream)

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self._error is None:
            await self._call("abort", request_id)

    async def stats(self) -> EngineStats:
        return await self._call("stats")

    def stats_nowait(self) -> EngineStats:
        """The counters the engine sent with its last step (or command)."""
        return self._stats

    async def cached_block_hashes(self) -> set[int]:
        return await self._call("hashes")

    async def shutdown(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # it may be exiting already
                self._send(("stop",))
            await asyncio.get_running_loop().run_in_executor(None, self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        seen: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                if stream.queue.empty() and not stream.wanting:
                    stream.wanting = True
                    self._send(("want", request_id))
                item = _latest(stream.queue, await stream.queue.get())
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield _delta(item, seen)
        finally:
            if not finished:
                await asyncio.shield(self.abort(request_id))
            self._streams.pop(request_id, None)

    async def _call(self, kind: str, *args):
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

    def _wait_ready(self) -> EngineStats:
        if not self._conn.poll(START_TIMEOUT_S):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start in {START_TIMEOUT_S:.0f} s")
        kind, value = self._conn.recv()
        if kind != "ready":
            self._process.join(5)
            raise RuntimeError(value)
        return value

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
            for out in msg[1]:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.wanting = False
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        elif kind == "result":
            _, command_id, ok, value, self._stats = msg
            entry = self._pending.get(command_id)
            if entry is not None:
                loop, future = entry
                loop.call_soon_threadsafe(_settle, future, value if ok else None,
                                          None if ok else value)
        elif kind == "dead":
            self._fail(msg[1])

    def _fail(self, message: str) -> None:
        if self._error is not None:
            return
        self._error = message
        dead = EngineDeadError(f"engine stopped: {message}")
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)
        for loop, future in list(self._pending.values()):
            loop.call_soon_threadsafe(_settle, future, None, dead)

