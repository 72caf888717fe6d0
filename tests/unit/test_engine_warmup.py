"""The readiness warm-up runs every kind of step once and leaves the engine as it found it."""

from __future__ import annotations

import torch
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams
from pagedserve.replicas.engine.warmup import warm_up

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)  # global RNG


class EagerAbove:
    """Stands in for the decode graphs on a CPU: the largest one holds `max_batch` rows, and
    every step runs eagerly (as a step above the largest graph would)."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch

    def padded_size(self, num_seqs: int) -> None:
        return None


def outputs(llm: LLM) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in (40, 7, 19)]
    outs = llm.generate(batch, [GREEDY, GREEDY, SAMPLED], use_tqdm=False)
    return [c.token_ids for o in outs for c in o.outputs]


def test_warm_up_runs_every_kind_of_step_and_leaves_the_engine_clean(tiny_llama):
    config = dict(progress=False, device="cpu", num_kvcache_blocks=128, max_num_batched_tokens=48,
                  max_num_seqs=8, max_model_len=256)
    untouched = outputs(LLM(str(tiny_llama), **config))
    llm = LLM(str(tiny_llama), **config)
    llm.engine.runner.graphs = EagerAbove(max_batch=4)
    kinds = warm_up(llm.engine)
    llm.engine.runner.graphs = None
    assert kinds >= {"prefill", "prefill_cached_prefix", "prefill_chunk", "mixed",
                     "decode_eager", "decode_above_graphs", "sample_greedy", "sample_random",
                     "sample_logprobs"}
    engine = llm.engine
    bm = engine.block_manager
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert engine.stats().prefix_cache_hit_rate == 0.0 and engine.stats().num_preemptions == 0
    assert outputs(llm) == untouched  # greedy and unseeded sampling alike


def test_cuda_engines_warm_up_before_ready_cpu_engines_do_not(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=64)
    assert "kernel_warmup" not in llm.engine.startup_phases


def test_early_graph_sizes_are_the_small_ones_and_the_largest():
    from pagedserve.replicas.engine.cuda_graphs import batch_size_ladder, early_sizes

    assert early_sizes(batch_size_ladder(256)) == [1, 2, 4, 8, 256]
    assert early_sizes(batch_size_ladder(5)) == [1, 2, 4, 5]
    assert early_sizes(batch_size_ladder(1)) == [1]
