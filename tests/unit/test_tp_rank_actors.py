"""TP=2 with rank 1 as a Ray actor in a placement group (gloo): same greedy tokens as TP=1.

This driver plays the replica's engine process (rank 0); the actor is started the way a
replica starts its ranks, in bundle 1 of a STRICT_PACK placement group.
"""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray_clusters import own_ray_cluster
from test_hf_equivalence import random_prompts
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams
from pagedserve.config import ClusterConfig
from pagedserve.replicas.engine.llm_engine import LLMEngine
from pagedserve.replicas.parallel.workers import RankWorkers, placement_bundles

MODEL = "llama-mha-untied-rope-llama3"


@pytest.fixture(scope="module")
def local_ray():
    with own_ray_cluster(num_cpus=4):
        yield


def _engine_greedy(engine: LLMEngine, prompts, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step(stream=False) if o.finished})
    return [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]


def test_rank_actor_in_placement_group_matches_single_rank(local_ray, tiny_model_factory):
    model_dir = str(tiny_model_factory(MODEL))
    engine_args = dict(model=model_dir, device="cpu", num_kvcache_blocks=64)
    config = ClusterConfig(engine={**engine_args, "tensor_parallel_size": 2},
                           replica_num_cpus=1, torch_threads=1)
    prompts = random_prompts([3, 33, 8, 70], TINY_VOCAB, seed=2)
    expected = _engine_greedy(LLM(**engine_args, progress=False).engine, prompts, 10)

    group = placement_group(placement_bundles(config), strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=60)
    ranks = RankWorkers(config, "test-tp", placement_group=group)
    try:
        engine = LLMEngine(config.engine, progress=False, init_method=ranks.init_method)
        try:
            assert ranks.stopped() is None
            assert _engine_greedy(engine, prompts, 10) == expected
        finally:
            engine.shutdown()
        assert ray.get(ranks.runs, timeout=60) == [None]  # a clean stop ends the rank's loop
        assert ranks.stopped() == "tensor-parallel rank 1 exited"
    finally:
        ranks.kill()
        remove_placement_group(group)
