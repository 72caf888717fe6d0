"""Weights from the object store: the same greedy tokens as from disk; a dead store means disk.

Runs its own small local Ray cluster (no Serve, no HTTP port) and shuts only that one down.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest
import ray
import torch
from ray_clusters import own_ray_cluster
from safetensors.torch import load_file, save_file

from pagedserve.config import ClusterConfig
from pagedserve.replicas.engine.startup_phases import PhaseTimer
from pagedserve.replicas.node.services import WEIGHT_STORE, NodeServices, find
from pagedserve.replicas.startup import start_engine
from pagedserve.sampling_params import SamplingParams

PROMPT = [5, 17, 33, 101, 7, 250, 12]
APP = "test-store"


@ray.remote(num_cpus=0)
class StoreRouter:
    """The router's two node-service calls a starting replica makes, on real `NodeServices`."""

    def __init__(self, app_name: str, model: str, max_gib: float = 1.0,
                 standby: dict | None = None) -> None:
        self.services = NodeServices(app_name, model, {"max_gib": max_gib}, standby)

    def ensure_node_services(self, node_id: str) -> bool:
        self.services.ensure(node_id)
        return True

    def forget_node_service(self, node_id: str, kind: str) -> None:
        self.services.forget(node_id, kind)


@pytest.fixture(scope="module")
def bf16_model(tiny_model_factory, tmp_path_factory):
    """A tiny checkpoint stored in bfloat16, so the store's uint16 path is exercised."""
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


def test_store_weights_give_disk_tokens_and_a_dead_store_falls_back(bf16_model, local_ray,
                                                                     caplog):
    config = _config(bf16_model)
    router = StoreRouter.remote(APP, str(bf16_model))

    async def main():
        from_disk = await _greedy_tokens(config, None)
        from_store = await _greedy_tokens(config, router)
        node = ray.get_runtime_context().get_node_id()
        store = find(APP, node, WEIGHT_STORE)
        stats = await store.stats.remote()
        ray.kill(store)
        await asyncio.sleep(0.5)
        with caplog.at_level(logging.WARNING, logger="pagedserve.replicas.node.weight_client"):
            after_death = await _greedy_tokens(config, router)
        return from_disk, from_store, stats, after_death

    from_disk, from_store, stats, after_death = asyncio.run(main())
    assert from_disk[1] == "disk" and from_store[1] == "object_store"
    assert len(from_disk[0]) == 12
    assert from_store[0] == from_disk[0]
    assert "weight_fetch" in from_store[2] and "weights" in from_store[2]
    assert stats["num_tensors"] > 0 and 0 < stats["bytes"] < 2**30
    assert after_death[1] == "disk" and after_death[0] == from_disk[0]
    assert any("loading the weights from disk" in r.getMessage() for r in caplog.records)


def test_a_model_over_the_bound_is_refused_and_replicas_use_disk(bf16_model, local_ray, caplog):
    config = _config(bf16_model)
    router = StoreRouter.remote(f"{APP}-small", str(bf16_model), 1e-6)
    with caplog.at_level(logging.WARNING, logger="pagedserve.replicas.node.weight_client"):
        tokens, source, _ = asyncio.run(_greedy_tokens(config, router, f"{APP}-small"))
    assert source == "disk" and len(tokens) == 12
    assert any("exceed the weight store's bound" in r.getMessage() for r in caplog.records)
