"""Weights from the node's weight store: the same greedy tokens as from disk, one shared-memory
copy that every replica maps (nothing staged in /dev/shm, nothing released by a replica); a dead
store or memory that cannot be opened means disk, with the reason logged.

Runs its own small local Ray cluster (no Serve, no HTTP port) and shuts only that one down.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import threading

import pytest
import ray
import torch
from ray_clusters import own_ray_cluster
from safetensors.torch import load_file, save_file

from pagedserve.config import ClusterConfig
from pagedserve.replicas.engine.startup_phases import PhaseTimer
from pagedserve.replicas.models.shared_weights import MEMFD_NAME, SharedWeights
from pagedserve.replicas.node.services import WEIGHT_STORE, NodeServices, find
from pagedserve.replicas.node.weight_client import fetch_shared_weights
from pagedserve.replicas.node.weight_store import store_name
from pagedserve.replicas.startup import start_engine
from pagedserve.sampling_params import SamplingParams

PROMPT = [5, 17, 33, 101, 7, 250, 12]
APP = "test-store"


@ray.remote(num_cpus=0)
class StoreRouter:
    """The router's two node-service calls a starting replica makes, on real `NodeServices`."""

    def __init__(self, app_name: str, model: str, max_gib: float | None = 1.0,
                 standby: dict | None = None) -> None:
        """`max_gib` None: no weight store."""
        store = {"max_gib": max_gib} if max_gib is not None else None
        self.services = NodeServices(app_name, model, store, standby)

    def ensure_node_services(self, node_id: str) -> bool:
        self.services.ensure(node_id)
        return True

    def forget_node_service(self, node_id: str, kind: str) -> None:
        self.services.forget(node_id, kind)


@pytest.fixture(scope="module")
def bf16_model(tiny_model_factory, tmp_path_factory):
    """A tiny checkpoint stored in bfloat16: the store keeps it in bfloat16, the engine casts."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(tiny_model_factory("llama-gqa-tied"), out)
    weights = load_file(out / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def local_ray():
    with own_ray_cluster(num_cpus=4):
        yield


def _config(model) -> ClusterConfig:
    return ClusterConfig(engine={"model": str(model), "device": "cpu", "dtype": "float32",
                                 "num_kvcache_blocks": 64, "max_num_seqs": 4},
                         torch_threads=1, weight_store={"max_gib": 1.0})


async def _greedy_tokens(config: ClusterConfig, router, app: str = APP
                         ) -> tuple[list[int], str, dict]:
    timer = PhaseTimer()
    engine, source = await start_engine(config, router, timer, app_name=app)
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        tokens = []
        async for delta in await engine.add_request(PROMPT, params, "r"):
            tokens += delta.outputs[0].token_ids
        return tokens, source, timer.phases
    finally:
        await engine.shutdown()


def _weight_files_in_dev_shm() -> set[str]:
    return set(glob.glob("/dev/shm/pagedserve-weights-*"))


class DevShmWatch:
    """Lists /dev/shm's weight files every few milliseconds while in its block: a file made
    and removed during a replica's start shows up in `seen`."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> DevShmWatch:
        self._before = _weight_files_in_dev_shm()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.seen |= _weight_files_in_dev_shm() - self._before


def test_store_weights_give_disk_tokens_and_a_dead_store_falls_back(bf16_model, local_ray,
                                                                     caplog):
    config = _config(bf16_model)
    router = StoreRouter.remote(APP, str(bf16_model))
    in_dev_shm = _weight_files_in_dev_shm()

    async def main():
        from_disk = await _greedy_tokens(config, None)
        with DevShmWatch() as watch:
            from_store = await _greedy_tokens(config, router)
            # The first replica released nothing of the store's: the next one maps it too.
            again = await _greedy_tokens(config, router)
        node = ray.get_runtime_context().get_node_id()
        store = find(APP, node, WEIGHT_STORE)
        stats = await store.stats.remote()
        ray.kill(store)
        await asyncio.sleep(0.5)
        with caplog.at_level(logging.WARNING, logger="pagedserve.replicas.node.weight_client"):
            after_death = await _greedy_tokens(config, router)
        return from_disk, from_store, again, stats, after_death, watch.seen

    from_disk, from_store, again, stats, after_death, staged = asyncio.run(main())
    assert from_disk[1] == "disk" and from_store[1] == "object_store"
    assert len(from_disk[0]) == 12
    assert from_store[0] == from_disk[0]
    assert again[1] == "object_store" and again[0] == from_disk[0]
    assert "weight_fetch" in from_store[2] and "weights" in from_store[2]
    assert stats["num_tensors"] > 0 and 0 < stats["bytes"] < 2**30
    assert not staged and _weight_files_in_dev_shm() == in_dev_shm  # no staging file
    assert after_death[1] == "disk" and after_death[0] == from_disk[0]
    assert any("loading the weights from disk" in r.getMessage() for r in caplog.records)


def test_the_handle_maps_the_checkpoints_tensors_read_only(bf16_model, local_ray):
    app = f"{APP}-handle"
    router = StoreRouter.remote(app, str(bf16_model))
    node = ray.get_runtime_context().get_node_id()
    ray.get(router.ensure_node_services.remote(node))
    shared = ray.get(find(app, node, WEIGHT_STORE).handle.remote())
    checkpoint = load_file(bf16_model / "model.safetensors")

    mapped = dict(shared.named_tensors())

    assert shared.path.startswith("/proc/") and shared.nbytes == sum(
        t.numel() * t.element_size() for t in checkpoint.values())
    assert mapped.keys() == checkpoint.keys()
    for name, tensor in checkpoint.items():
        assert mapped[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(mapped[name], tensor), name
    with open("/proc/self/maps") as maps:
        ours = [line.split() for line in maps if f"memfd:{MEMFD_NAME}" in line]
    assert ours and all(fields[1] == "r--s" for fields in ours)  # shared and read-only
    # The memory is the store's file itself, not a copy: same inode.
    assert {int(fields[4]) for fields in ours} == {os.stat(shared.path).st_ino}


@ray.remote(num_cpus=0)
class UnreadableStore:
    """Stands in for a store whose memory this replica cannot open."""

    def handle(self) -> SharedWeights:
        return SharedWeights(f"/proc/{os.getpid()}/fd/999999", ())


def test_store_memory_that_cannot_be_opened_means_disk_with_the_reason(local_ray, caplog):
    app = f"{APP}-unreadable"
    node = ray.get_runtime_context().get_node_id()
    store = UnreadableStore.options(name=store_name(app, node)).remote()
    ray.get(store.__ray_ready__.remote())
    with caplog.at_level(logging.WARNING, logger="pagedserve.replicas.node.weight_client"):
        shared = asyncio.run(fetch_shared_weights(app, None, 30.0))
    assert shared is None
    reasons = [r.getMessage() for r in caplog.records if "loading the weights from disk"
               in r.getMessage()]
    assert reasons and "cannot open the store's shared memory" in reasons[0], reasons


def test_a_model_over_the_bound_is_refused_and_replicas_use_disk(bf16_model, local_ray, caplog):
    config = _config(bf16_model)
    router = StoreRouter.remote(f"{APP}-small", str(bf16_model), 1e-6)
    with caplog.at_level(logging.WARNING, logger="pagedserve.replicas.node.weight_client"):
        tokens, source, _ = asyncio.run(_greedy_tokens(config, router, f"{APP}-small"))
    assert source == "disk" and len(tokens) == 12
    assert any("exceed the weight store's bound" in r.getMessage() for r in caplog.records)
