"""A node's pool of standby engine processes (`standby_process`), found by name.

One pool actor per node and application keeps `per_node` standbys ready. A starting replica on
the node claims one (`claim`), connects to its socket and hands it its engine config; the
standby then is that replica's engine process. A claimed or dead standby is replaced in the
background, so the next replica finds one ready too.

Host-mode standbys on a node with a weight store share the store's memory: the pool, a Ray
worker, asks the store (by name) for its handle, waiting while it loads, and sends it to each
standby over its control pipe (the standby cannot reach Ray). A standby reports where its
weights came from when ready (`stats()["weights"]`, and a claim's `"weights"`).

Resources: the pool asks Ray for no CPU and no GPU, and its standbys are plain processes, so
they never hold a reservation that stops Serve from placing a replica. A `device`-mode standby
does use GPU memory (the model's weights) on a GPU Ray may hand to a replica: that replica
adopts it, with the weights already in place. Size `gpu_memory_utilization` with that in mind
when replicas share a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field

import ray

from pagedserve.replicas.engine.spawn_main import without_parent_main
from pagedserve.replicas.node.failures import short_error
from pagedserve.replicas.node.standby_process import run_standby
from pagedserve.replicas.node.standby_weights import WEIGHTS_MESSAGE

logger = logging.getLogger("ray.serve")

POOL_NAME_PREFIX = "pagedserve-standby"
WATCH_PERIOD_S = 0.5
START_TIMEOUT_S = 600.0  # a standby's imports and preload; it is replaced if it takes longer
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0  # after a standby failed before it was ready
# How long a host-mode standby waits for a loading weight store before it reads the files
# itself (within START_TIMEOUT_S, which also covers that read).
STORE_WAIT_S = 300.0


def pool_name(app_name: str, node_id: str) -> str:
    return f"{POOL_NAME_PREFIX}-{app_name}-{node_id[:16]}"


@dataclass
class _Standby:
    process: multiprocessing.Process
    control: object  # the pool's end of the pipe
    address: str
    authkey: bytes
    gpu: int | None
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    phases: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # where its weights came from
    store_offer: asyncio.Task | None = None  # sending it the weight store's handle


@ray.remote(num_cpus=0)
class StandbyPool:
    """Keeps `per_node` standby engines of one engine config ready on this node."""

    def __init__(self, engine_config: dict, per_node: int, mode: str, num_gpus: int = 0,
                 weight_store: str | None = None) -> None:
        """`weight_store`: the name of the node's weight store actor, if it has one."""
        self.engine_config, self.per_node, self.mode = engine_config, per_node, mode
        self.num_gpus = num_gpus
        self.weight_store = weight_store if mode == "host" else None  # only host mode maps it
        self._dir = tempfile.mkdtemp(prefix="pagedserve-standby-")
        self._ctx = multiprocessing.get_context("spawn")
        self._standbys: list[_Standby] = []
        # Claimed standbys, kept (their pipe open, so they do not take the pool for gone)
        # until they exit, and reaped then.
        self._adopted: list[_Standby] = []
        self.counts = {"spawned": 0, "claimed": 0, "replaced": 0, "failed": 0}
        self._serial = 0
        self._backoff_s, self._respawn_at = 0.0, 0.0
        for _ in range(per_node):
            self._spawn()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Begin replacing dead standbys in the background (the creator calls this once)."""
        self._ensure_watcher()

    async def claim(self, gpu_ids: list[int]) -> dict | None:
        """A ready standby for a replica on `gpu_ids` (its socket, key and pid), or None."""
        self._ensure_watcher()
        self._poll()
        for standby in self._standbys:
            if standby.ready and self._fits(standby, gpu_ids):
                self._standbys.remove(standby)
                self._adopted.append(standby)
                self.counts["claimed"] += 1
                self._spawn()
                return {"address": standby.address, "authkey": standby.authkey,
                        "pid": standby.process.pid, "mode": self.mode,
                        "phases": standby.phases, "weights": standby.weights}
        return None

    def stats(self) -> dict:
        """Counts (spawned, claimed, replaced, failed), the standbys ready now and where each
        ready one's weights came from."""
        self._poll()
        return {**self.counts, "ready": sum(1 for s in self._standbys if s.ready),
                "starting": sum(1 for s in self._standbys if not s.ready),
                "pids": [s.process.pid for s in self._standbys], "mode": self.mode,
                "weights": {s.process.pid: s.weights for s in self._standbys if s.ready}}

    def kill_standby(self, pid: int) -> bool:
        """Kill one unclaimed standby (tests and operators: a dead standby gets replaced)."""
        for standby in self._standbys:
            if standby.process.pid == pid:
                standby.process.kill()
                return True
        return False

    def _fits(self, standby: _Standby, gpu_ids: list[int]) -> bool:
        return self.mode != "device" or standby.gpu is None or standby.gpu in gpu_ids[:1]

    def _spawn(self) -> None:
        self._serial += 1
        gpu = (self._serial - 1) % self.num_gpus if self.num_gpus else None
        address = os.path.join(self._dir, f"standby-{self._serial}.sock")
        authkey = secrets.token_bytes(16)
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=run_standby, name="pagedserve-standby", daemon=True,
            args=(theirs, address, authkey, self.engine_config, self.mode, gpu,
                  None if self.weight_store is None else STORE_WAIT_S))
        with _all_gpus_visible(), without_parent_main():
            process.start()
        theirs.close()
        self._standbys.append(_Standby(process, ours, address, authkey, gpu))
        self.counts["spawned"] += 1

    def _poll(self) -> None:
        """Mark standbys ready, replace dead or stuck ones, reap adopted ones that exited."""
        for standby in list(self._standbys):
            self._read_messages(standby)
            stuck = not standby.ready and time.monotonic() - standby.started > START_TIMEOUT_S
            if standby.process.is_alive() and not stuck:
                continue
            self._backoff_s = min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, 2 * self._backoff_s))
            self._respawn_at = time.monotonic() + (0.0 if standby.ready else self._backoff_s)
            logger.warning("standby engine %s %s; starting another%s", standby.process.pid,
                           "did not start in time" if stuck else
                           f"exited ({standby.process.exitcode})",
                           "" if standby.ready else f" in {self._backoff_s:.0f} s")
            standby.process.kill()
            self._standbys.remove(standby)
            self.counts["replaced"] += 1
        while len(self._standbys) < self.per_node and time.monotonic() >= self._respawn_at:
            self._spawn()
        self._adopted = [s for s in self._adopted if s.process.is_alive()]

    def _read_messages(self, standby: _Standby) -> None:
        with contextlib.suppress(EOFError, OSError):
            while standby.control.poll(0):
                message = standby.control.recv()
                if message[0] == "ready":
                    standby.ready, standby.phases, standby.weights = True, *message[2:4]
                    self._backoff_s = 0.0
                elif message[0] == "failed":
                    self.counts["failed"] += 1
                    logger.warning("standby engine failed to start: %s", message[1])

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self._poll()
            self._offer_store()
            await asyncio.sleep(WATCH_PERIOD_S)

    def _offer_store(self) -> None:
        """Start sending the store's handle to each new standby that waits for it."""
        if self.weight_store is None:
            return
        loop = asyncio.get_running_loop()
        for standby in self._standbys:
            if standby.store_offer is None:
                standby.store_offer = loop.create_task(self._send_store_handle(standby))

    async def _send_store_handle(self, standby: _Standby) -> None:
        """The store's handle (or None and why not), once the store has loaded, within
        STORE_WAIT_S. The store's name exists from its creation on (`NodeServices.ensure`
        creates it before this pool), so a name that is not found means a store that died."""
        shared, why = None, None
        try:
            store = ray.get_actor(self.weight_store)
            shared = await asyncio.wait_for(store.handle.remote(), STORE_WAIT_S)
        except ValueError:
            why = f"the node has no weight store (no actor named {self.weight_store!r})"
        except TimeoutError:
            why = f"the weight store did not load in {STORE_WAIT_S:.0f} s"
        except Exception as err:  # noqa: BLE001 (any failure: the standby reads the files)
            why = f"the weight store failed ({short_error(err)})"
        if why is not None:
            logger.warning("a host-mode standby engine will read the weights from the files: "
                           "%s", why)
        with contextlib.suppress(OSError):  # the standby is gone
            standby.control.send((WEIGHTS_MESSAGE, shared, why))


@contextlib.contextmanager
def _all_gpus_visible():
    """Start a child that sees every GPU of the node (the pool itself was given none): the
    adopting replica names its own, and the standby selects it."""
    saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
