"""`AsyncEngine`'s interface over an engine in its own process (see `engine_core`).

A server uses this one: its event loop and threads then never compete with the engine's steps
for a GIL. A reader thread receives the engine's messages and hands outputs to the asyncio
streams; a stream tells the engine it wants news only when its consumer is waiting, so a busy
server gets fewer deltas carrying more tokens and the engine never builds outputs nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client

from pagedserve.config import EngineConfig
from pagedserve.replicas.engine.engine_core import run_engine_core
from pagedserve.replicas.engine.engine_front import EngineDeadError, EngineFront, settle
from pagedserve.replicas.engine.engine_stats import EngineStats
from pagedserve.replicas.engine.spawn_main import without_parent_main
from pagedserve.replicas.engine.wire import decode_output

START_TIMEOUT_S = 1800.0  # a large model's first load converts and profiles
ALIVE_CHECK_S = 0.5  # while waiting for the engine, check this often that it still runs


class ProcessEngine(EngineFront):
    """Same calls as `AsyncEngine`; the engine runs in a child process it owns."""

    def __init__(self, config: EngineConfig, torch_threads: int | None = None,
                 max_deltas_per_s: float | None = None, init_method: str | None = None,
                 shared_weights=None, standby: dict | None = None,
                 gpu_ids: list[int] | None = None,
                 rank_failure: Callable[[], str | None] | None = None) -> None:
        """`max_deltas_per_s`: see `EngineFront`; `init_method`: where the other
        tensor-parallel ranks wait for this engine (rank 0); `rank_failure`: says which of
        those ranks died (else None), checked while the engine starts; `shared_weights`: a
        `SharedWeights` to load instead of the model's files; `standby`: a claimed standby
        engine process (`StandbyPool.claim`) to adopt instead of spawning one; `gpu_ids`:
        this replica's GPUs, which an adopted standby selects."""
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
        super().__init__(max_deltas_per_s)
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

    def _wait_ready(self, rank_failure: Callable[[], str | None] | None) -> EngineStats:
        """The engine's ready message; raises if it (or a rank) dies, fails or takes too
        long first."""
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
        stream = self._streams.get(wire[0])
        if stream is None:  # aborted meanwhile
            return
        if wire[1] is not None:  # the request's first output brings its prompt
            stream.prompt = wire[1]
        self._deliver(decode_output(wire, stream.prompt))

    def _fail(self, message: str) -> None:
        if self._error is not None:
            return
        self._error = message
        dead = EngineDeadError(f"engine stopped: {message}")
        self._fail_streams(dead)
        for loop, future in list(self._pending.values()):
            loop.call_soon_threadsafe(settle, future, None, dead)



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
