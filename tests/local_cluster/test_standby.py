"""Standby engines: a replica adopts one (no spawn) and gets the disk path's tokens; its engine
ends with it; a dead standby is replaced; with none ready the replica spawns and says why. A
host-mode standby maps the node's weight store instead of keeping a copy of its own, and reads
the files (saying why) when the store cannot serve it.

Runs its own small local Ray cluster (no Serve, no HTTP port). A stand-in replica actor runs
the real start path (`replicas.startup.start_engine`) against real `NodeServices`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time

import pytest
import ray
import torch
from ray_clusters import own_ray_cluster
from safetensors.torch import load_file, save_file

from local_cluster.test_weight_store import StoreRouter
from pagedserve.config import ClusterConfig
from pagedserve.replicas.engine.startup_phases import PhaseTimer
from pagedserve.replicas.models.shared_weights import MEMFD_NAME
from pagedserve.replicas.node.services import STANDBY_POOL, WEIGHT_STORE, find
from pagedserve.replicas.node.standby_client import claim_standby
from pagedserve.replicas.startup import start_engine
from pagedserve.sampling_params import SamplingParams

PROMPT = [5, 17, 33, 101, 7, 250, 12]
APP = "test-standby"
READY_TIMEOUT_S = 120
EXIT_BOUND_S = 5.0
EXTRA_BYTES = 96 * 2**20  # a checkpoint tensor no layer uses, to make the model's size show
WEIGHTS_FROM = {"host": "weight_store", "imported": "adoption", "device": "files"}


def _config(model, mode: str = "host", per_node: int = 1) -> ClusterConfig:
    return ClusterConfig(engine={"model": str(model), "device": "cpu", "dtype": "float32",
                                 "num_kvcache_blocks": 64, "max_num_seqs": 4},
                         torch_threads=1, standby={"per_node": per_node, "mode": mode})


@ray.remote(num_cpus=0)
class StandInReplica:
    """Starts an engine the way a replica does and keeps it until killed."""

    async def start(self, config: dict, router, app: str) -> dict:
        self.engine, source = await start_engine(ClusterConfig(**config), router, PhaseTimer(),
                                                 app_name=app)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        tokens = []
        async for delta in await self.engine.add_request(PROMPT, params, "r"):
            tokens += delta.outputs[0].token_ids
        return {"tokens": tokens, "source": source, "pid": self.engine.pid,
                "phases": self.engine.startup_phases, "standby": self.engine.standby_phases}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_ready_standbys(pool, count: int) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = ray.get(pool.stats.remote())
        if stats["ready"] >= count:
            return stats
        time.sleep(0.5)
    pytest.fail(f"standby pool not ready in {READY_TIMEOUT_S} s: {stats}")


@pytest.fixture(scope="module")
def local_ray():
    with own_ray_cluster(num_cpus=4):
        yield


@pytest.mark.parametrize("mode", ["host", "imported", "device"])
def test_a_replica_adopts_a_standby_and_its_engine_ends_with_it(tiny_llama, local_ray, mode):
    app = f"{APP}-{mode}"
    disk_config = _config(tiny_llama, per_node=0)
    config = _config(tiny_llama, mode)
    router = StoreRouter.remote(app, str(tiny_llama), 1.0, {
        "engine": config.engine.model_dump(), "per_node": 1, "mode": mode})
    node = ray.get_runtime_context().get_node_id()
    ray.get(router.ensure_node_services.remote(node))
    pool = find(app, node, STANDBY_POOL)
    before = _wait_ready_standbys(pool, 1)

    from_disk = ray.get(StandInReplica.remote().start.remote(disk_config.model_dump(), None, app))
    replica = StandInReplica.remote()
    adopted = ray.get(replica.start.remote(config.model_dump(), router, app))
    after = ray.get(pool.stats.remote())

    assert from_disk["source"] == "disk"
    assert adopted["source"] == f"standby_{mode}"
    assert adopted["pid"] in before["pids"]  # the standby became the engine: nothing spawned
    assert after["claimed"] == 1 and after["spawned"] == before["spawned"] + 1  # its successor
    assert before["weights"][adopted["pid"]]["from"] == WEIGHTS_FROM[mode]
    assert adopted["tokens"] == from_disk["tokens"] and len(adopted["tokens"]) == 12
    # The standby read the model's config and tokenizer ahead (or built the whole engine).
    assert "standby_preload" in adopted["standby"]
    assert adopted["phases"].get("model_files", 0.0) < 0.05, adopted["phases"]
    assert from_disk["phases"]["model_files"] > adopted["phases"].get("model_files", 0.0)

    ray.kill(replica)
    deadline = time.monotonic() + EXIT_BOUND_S
    while _alive(adopted["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(adopted["pid"]), f"the adopted engine outlived its replica by {EXIT_BOUND_S} s"


def test_a_spawned_engine_ends_with_its_replica(tiny_llama, local_ray):
    replica = StandInReplica.remote()
    started = ray.get(replica.start.remote(_config(tiny_llama, per_node=0).model_dump(), None,
                                           APP))
    ray.kill(replica)
    deadline = time.monotonic() + EXIT_BOUND_S
    while _alive(started["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(started["pid"])


def test_a_dead_standby_is_replaced(tiny_llama, local_ray):
    app = f"{APP}-replace"
    config = _config(tiny_llama, "imported")
    router = StoreRouter.remote(app, str(tiny_llama), 1.0, {
        "engine": config.engine.model_dump(), "per_node": 1, "mode": "imported"})
    node = ray.get_runtime_context().get_node_id()
    ray.get(router.ensure_node_services.remote(node))
    pool = find(app, node, STANDBY_POOL)
    first = _wait_ready_standbys(pool, 1)
    assert ray.get(pool.kill_standby.remote(first["pids"][0]))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        stats = ray.get(pool.stats.remote())
        if stats["replaced"] >= 1 and stats["ready"] == 1:
            break
        time.sleep(0.5)
    assert stats["replaced"] >= 1 and stats["ready"] == 1, stats
    assert stats["pids"][0] != first["pids"][0] and _alive(stats["pids"][0])
    assert not _alive(first["pids"][0])


def test_no_standby_means_spawn_with_a_logged_reason(tiny_llama, local_ray, caplog):
    config = _config(tiny_llama, "imported")
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            claimed = asyncio.run(claim_standby(config, None, f"{APP}-none", []))
    finally:
        serve_logger.removeHandler(caplog.handler)
    assert claimed is None
    reasons = [r.getMessage() for r in caplog.records if "no standby engine" in r.getMessage()]
    assert reasons and "has no standby pool; spawning" in reasons[0]
    spawned = ray.get(StandInReplica.remote().start.remote(config.model_dump(), None,
                                                           f"{APP}-none"))
    assert spawned["source"] == "disk" and len(spawned["tokens"]) == 12


@pytest.fixture(scope="module")
def big_llama(tiny_llama, tmp_path_factory):
    """The tiny checkpoint plus one large tensor that no layer uses (the loader skips it)."""
    out = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(tiny_llama, out)
    weights = load_file(out / "model.safetensors")
    weights["extra.unused"] = torch.randn(EXTRA_BYTES // 4)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _ready_pool(app: str, model, mode: str, max_gib: float | None = 1.0):
    """A router with this node's services for `app` (a store unless `max_gib` is None), and
    the stats of its pool once one standby is ready."""
    standby = {"engine": _config(model, mode).engine.model_dump(), "per_node": 1, "mode": mode}
    router = StoreRouter.remote(app, str(model), max_gib, standby)
    node = ray.get_runtime_context().get_node_id()
    ray.get(router.ensure_node_services.remote(node))
    return router, _wait_ready_standbys(find(app, node, STANDBY_POOL), 1)


def _memfd_inodes(pid: int) -> set[int]:
    with open(f"/proc/{pid}/maps") as maps:
        return {int(line.split()[4]) for line in maps if f"memfd:{MEMFD_NAME}" in line}


def _own_resident_bytes(pid: int) -> int:
    """Resident memory that is the process's own: anonymous and file pages, not shared memory
    (which a mapping of the store's file is)."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


def test_a_host_standby_maps_the_store_instead_of_holding_a_copy(big_llama, local_ray):
    app = f"{APP}-shared"
    host_router, host = _ready_pool(app, big_llama, "host")
    baseline_router, baseline = _ready_pool(f"{APP}-baseline", big_llama, "imported", None)
    pid, baseline_pid = host["pids"][0], baseline["pids"][0]
    store = find(app, ray.get_runtime_context().get_node_id(), WEIGHT_STORE)
    shared = ray.get(store.handle.remote())

    assert host["weights"][pid]["from"] == "weight_store"
    assert shared.nbytes > EXTRA_BYTES
    # It maps the store's file itself (same inode), and holds no copy of the model: its own
    # memory is within half the model's size of a standby that holds no weights at all.
    assert _memfd_inodes(pid) == {os.stat(shared.path).st_ino}
    assert not _memfd_inodes(baseline_pid)
    own, without_weights = _own_resident_bytes(pid), _own_resident_bytes(baseline_pid)
    assert own < without_weights + shared.nbytes // 2, (own, without_weights, shared.nbytes)
    del host_router, baseline_router


@pytest.mark.parametrize("max_gib", [None, 1e-6], ids=["no-store", "store-refused-the-model"])
def test_a_host_standby_without_a_usable_store_reads_the_files(tiny_llama, local_ray, max_gib):
    app = f"{APP}-files-{'none' if max_gib is None else 'refused'}"
    router, stats = _ready_pool(app, tiny_llama, "host", max_gib)
    weights = stats["weights"][stats["pids"][0]]
    from_disk = ray.get(StandInReplica.remote().start.remote(
        _config(tiny_llama, per_node=0).model_dump(), None, app))
    adopted = ray.get(StandInReplica.remote().start.remote(
        _config(tiny_llama, "host").model_dump(), router, app))

    assert weights["from"] == "files"
    if max_gib is None:
        assert "why" not in weights  # no store configured: nothing to explain
    else:
        assert "exceed the weight store's bound" in weights["why"], weights
    assert adopted["source"] == "standby_host" and adopted["pid"] == stats["pids"][0]
    assert adopted["tokens"] == from_disk["tokens"]
