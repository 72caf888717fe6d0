"""The pipelined step (launch the next batch before the last one's tokens are applied) changes
nothing but timing. It is on by default on CUDA only; here it is switched on for a CPU engine."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams


def prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def run(tiny_llama, pipelined: bool, batch, params, **kwargs):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", **kwargs)
    llm.engine.overlap_steps = pipelined
    outs = llm.generate(batch, params, use_tqdm=False)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for o in outs for c in o.outputs]


BATCH = prompts([70, 9, 33, 128, 50, 2])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=17, min_tokens=3),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, logprobs=2),
    SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, presence_penalty=0.5),
    SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9),
], ids=["greedy", "min-tokens", "seeded-top-p", "penalties", "n2"])
def test_pipelined_equals_sequential(tiny_llama, params):
    kwargs = {"num_kvcache_blocks": 256}
    assert run(tiny_llama, True, BATCH, params, **kwargs) == run(
        tiny_llama, False, BATCH, params, **kwargs)


def test_pipelined_with_preemption_and_chunks(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kwargs = {"num_kvcache_blocks": 14, "max_num_batched_tokens": 40}
    assert run(tiny_llama, True, BATCH, params, **kwargs) == run(
        tiny_llama, False, BATCH, params, **kwargs)


def test_pipelined_stop_tokens_and_strings(tiny_llama):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = run(tiny_llama, False, BATCH[:1], greedy, num_kvcache_blocks=64)[0]
    stop_id = full[0][6]
    words = full[1].split()
    for params in (SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                   SamplingParams(temperature=0, max_tokens=20, stop=[f"{words[4]} {words[5]}"],
                                  ignore_eos=True)):
        got = run(tiny_llama, True, BATCH, params, num_kvcache_blocks=64)
        assert got == run(tiny_llama, False, BATCH, params, num_kvcache_blocks=64)
        assert got[0][2] == "stop" and len(got[0][0]) < 20


def test_pipelined_abort_frees_blocks_and_drops_placeholders(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=64)
    llm.engine.overlap_steps = True
    engine = llm.engine
    engine.add_request("a", BATCH[0], SamplingParams(temperature=0, max_tokens=30))
    engine.add_request("b", BATCH[1], SamplingParams(temperature=0, max_tokens=30))
    for _ in range(4):
        engine.step()
    out = engine.abort("a")
    assert out.outputs[0].finish_reason == "abort" and -1 not in out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # collects the last launched batch, whose rows are all finished
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
