"""Decode through captured CUDA graphs gives what the eager forward gives."""

from __future__ import annotations

import pytest
import torch
from gpu_models import write_gpu_model
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams
from pagedserve.replicas.engine.cuda_graphs import batch_size_ladder

pytestmark = pytest.mark.gpu

LENGTHS = [1, 5, 17, 40, 3, 64, 100, 16, 33]  # 9 rows: replays pad them to 16


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_gpu_model(tmp_path_factory.mktemp("gpu") / "m", "llama-gqa-hd64")


def test_ladder_covers_every_batch_size():
    sizes = batch_size_ladder(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b - a <= 8 for a, b in zip(sizes, sizes[1:], strict=False))
    assert batch_size_ladder(3) == [1, 2, 3]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager_decode(model_dir, dtype):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(model_dir), device="cuda", dtype=dtype, progress=False,
                  num_kvcache_blocks=256, max_num_seqs=32, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        outs = llm.generate(prompts(), params, use_tqdm=False)
        runs[eager] = [o.outputs[0] for o in outs]
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    for eager_out, graph_out in zip(runs[True], runs[False], strict=True):
        assert graph_out.token_ids == eager_out.token_ids
        for a, b in zip(eager_out.logprobs, graph_out.logprobs, strict=True):
            (tok_a, lp_a), = a.items()
            assert b[tok_a] == pytest.approx(lp_a, abs=1e-3 if dtype == "float32" else 5e-2)


def test_graph_replay_matches_eager_forward_on_one_step(model_dir):
    """Hidden states of one padded replay equal the eager forward's, row by row."""
    from pagedserve.replicas.engine import step_inputs
    from pagedserve.replicas.engine.scheduler import ScheduledSeq, SchedulerOutput

    llm = LLM(str(model_dir), device="cuda", dtype="float32", progress=False,
              num_kvcache_blocks=256, max_num_seqs=32)
    engine = llm.engine
    for i, p in enumerate(prompts()[:5]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=8))
    for _ in range(3):
        engine.step()
    seqs = [s for s in engine.scheduler.running if s.num_uncomputed_tokens == 1]
    assert seqs
    runner = engine.runner
    torch.cuda.synchronize()
    batch = SchedulerOutput([ScheduledSeq(s, 1) for s in seqs])
    size = runner.graphs.padded_size(len(seqs))
    with torch.inference_mode():
        host = step_inputs.prepare(batch, runner.block_size, runner._prev_rows, pad_to=size)
        inputs = step_inputs.upload(host, runner.device)
        if len(host.fill_rows):
            inputs.ids.index_copy_(0, inputs.fill_rows,
                                   runner._prev_tokens.index_select(0, inputs.fill_from))
        replay = runner.graphs.run(inputs, size)[: len(seqs)].clone()
        eager = runner.model(inputs.ids, inputs.positions, inputs.meta, runner.kv_cache)
    torch.testing.assert_close(replay, eager[: len(seqs)], rtol=1e-4, atol=1e-4)


def test_deferred_graphs_decode_like_eager_before_and_after_the_rest_are_captured(model_dir):
    """A server's engine captures the early sizes before ready and the rest when idle; a batch
    of 9 pads to the largest graph until 16 exists, with the eager forward's tokens throughout."""
    from pagedserve.config import EngineConfig
    from pagedserve.replicas.engine.cuda_graphs import early_sizes
    from pagedserve.replicas.engine.llm_engine import LLMEngine

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    config = EngineConfig(model=str(model_dir), device="cuda", dtype="float32",
                          num_kvcache_blocks=256, max_num_seqs=32)

    def tokens(engine) -> list[list[int]]:
        for i, p in enumerate(prompts()):
            engine.add_request(f"r{i}", p, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step(stream=False):
                done[out.request_id] = out.outputs[0].token_ids
        return [done[f"r{i}"] for i in range(len(LENGTHS))]

    eager = tokens(LLMEngine(config.model_copy(update={"enforce_eager": True}), progress=False))
    engine = LLMEngine(config, progress=False, defer_graphs=True)
    graphs = engine.runner.graphs
    assert graphs.sizes == early_sizes(graphs.ladder) == [1, 2, 4, 8, 32]
    assert graphs.padded_size(len(LENGTHS)) == 32
    assert tokens(engine) == eager
    # The captures' warm-up forwards write no keys or values: the graph buffers still hold the
    # last replays' slots, and a block they name may since belong to another sequence (here:
    # the cache is zeroed, so any write shows; the served blocks are put back after).
    kv_cache = engine.runner.kv_cache
    served = kv_cache.clone()
    kv_cache.zero_()
    while engine.idle_work():
        pass
    assert not kv_cache.any()
    kv_cache.copy_(served)
    assert graphs.sizes == graphs.ladder and not graphs.pending
    assert graphs.padded_size(len(LENGTHS)) == 16
    assert tokens(engine) == eager
