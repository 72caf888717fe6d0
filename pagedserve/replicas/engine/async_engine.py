"""asyncio front of the engine in this process: `add_request` gives an async iterator of deltas."""

from __future__ import annotations

import asyncio
import queue
import threading

from pagedserve.config import EngineConfig
from pagedserve.replicas.engine.engine_front import EngineDeadError, EngineFront, settle
from pagedserve.replicas.engine.engine_stats import EngineStats
from pagedserve.replicas.engine.llm_engine import LLMEngine

__all__ = ["AsyncEngine", "EngineDeadError"]


class AsyncEngine(EngineFront):
    """Steps `LLMEngine` on its own thread and fans results out to asyncio streams.

    One thread owns the engine and its tokenizer: it runs adds, aborts and reads between steps
    and otherwise steps back to back, never waiting for the event loop. Outputs are built only
    for streams whose consumer is waiting (or that finished), so a consumer slower than the
    engine gets fewer deltas carrying more tokens, and the engine does no work for nobody.
    """

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._work = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._handlers = {
            "add": engine.add_request, "abort": engine.abort, "stats": engine.stats,
            "hashes": engine.block_manager.cached_block_hashes,
        }

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> AsyncEngine:
        return cls(LLMEngine(config, progress=progress))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    def stats_nowait(self) -> EngineStats:
        """A snapshot read from the event loop without waiting for a running step.

        It reads only counters and lengths, so it is consistent enough for routing decisions.
        """
        return self.engine.stats()

    async def shutdown(self) -> None:
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    async def _command(self, kind: str, *args):
        """Run the command on the engine thread between two steps and return its result."""
        self.check_health()
        if self._thread is None:
            self._thread = threading.Thread(target=self._engine_thread, daemon=True,
                                            name="pagedserve-engine")
            self._thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((self._handlers[kind], args, loop, future))
        self._work.set()
        return await future

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
                self._deliver(out)

    def _wants_output(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        return stream is not None and stream.wanting

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args, loop, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(*args)
            except BaseException as err:
                loop.call_soon_threadsafe(settle, future, None, err)
            else:
                loop.call_soon_threadsafe(settle, future, result, None)

    def _fail(self, err: BaseException) -> None:
        self._error = repr(err)
        dead = EngineDeadError(f"engine stopped: {err!r}")
        dead.__cause__ = err
        self._fail_streams(dead)
        while True:
            try:
                _, _, loop, future = self._commands.get_nowait()
            except queue.Empty:
                return
            loop.call_soon_threadsafe(settle, future, None, dead)
