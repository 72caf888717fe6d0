"""Engine invariants: prefix caching, chunking and preemption change nothing but speed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def token_ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.fixture(scope="module")
def baseline(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256, enable_prefix_caching=False)
    batch = prompts([70, 9, 33, 128, 50, 2])
    return batch, token_ids(llm.generate(batch, GREEDY, use_tqdm=False))


def test_prefix_cache_hit_equals_miss_and_reuses_blocks(tiny_llama, baseline):
    batch, expected = baseline
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256)
    first = llm.generate(batch[0], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    bm = llm.engine.block_manager
    hits_before = bm.num_prefix_hits
    second = llm.generate(batch[0], GREEDY, use_tqdm=False)[0]
    # 70 prompt tokens: 4 full blocks of 16 are reused, the rest is computed again
    assert second.num_cached_tokens == 64
    assert bm.num_prefix_hits - hits_before == 64
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected[0]
    extended = batch[0] + batch[1]  # shares the first prompt's blocks, then diverges
    third = llm.generate(extended, GREEDY, use_tqdm=False)[0]
    assert third.num_cached_tokens == 64
    assert_all_blocks_free(llm)


def test_chunked_prefill_equals_unchunked(tiny_llama, baseline):
    batch, expected = baseline
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256, max_num_batched_tokens=24,
              enable_prefix_caching=False)
    assert token_ids(llm.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert_all_blocks_free(llm)


def test_unchunked_waits_for_budget(tiny_llama, baseline):
    batch, expected = baseline
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256, max_num_batched_tokens=256,
              enable_chunked_prefill=False, max_model_len=256, enable_prefix_caching=False)
    assert token_ids(llm.generate(batch, GREEDY, use_tqdm=False)) == expected


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_run_equals_uninterrupted(tiny_llama, baseline, prefix_caching):
    batch, expected = baseline
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=14, block_size=16,
              enable_prefix_caching=prefix_caching)
    assert token_ids(llm.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_n2_with_seed_is_reproducible_and_shares_prompt_blocks(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256, enable_prefix_caching=False)
    prompt = prompts([50])[0]
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    hits_before = llm.engine.block_manager.num_prefix_hits
    first = token_ids(llm.generate(prompt, params, use_tqdm=False))
    # completion 1 reuses completion 0's three full prompt blocks instead of recomputing them
    assert llm.engine.block_manager.num_prefix_hits - hits_before == 48
    second = token_ids(llm.generate(prompt, params, use_tqdm=False))
    assert first == second
    assert first[0] != first[1]
    other_seed = token_ids(llm.generate(prompt, SamplingParams(
        n=2, temperature=1.0, seed=8, max_tokens=16, ignore_eos=True), use_tqdm=False))
    assert other_seed != first
    assert_all_blocks_free(llm)


def test_stop_token_ids_end_generation_exactly(tiny_llama, baseline):
    batch, expected = baseline
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256)
    stop_id = expected[0][6]
    first_at = expected[0].index(stop_id)
    out = llm.generate(batch[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected[0][: first_at + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_ends_generation_and_is_not_returned(tiny_llama, baseline):
    batch, expected = baseline
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256)
    full = llm.generate(batch[0], GREEDY, use_tqdm=False)[0].outputs[0]
    words = full.text.split()
    stop = f"{words[4]} {words[5]}"  # spans two tokens
    cut = full.text.index(stop)
    out = llm.generate(batch[0], SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate(batch[0], SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                 ignore_eos=True, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: cut + len(stop)]


def test_max_tokens_and_max_model_len_finish_with_length(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=256, max_model_len=40)
    out = llm.generate(prompts([30])[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_abort_mid_generation_frees_every_block(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=64)
    engine = llm.engine
    for i, p in enumerate(prompts([40, 70, 20, 90])):
        engine.add_request(f"r{i}", p, SamplingParams(n=2, temperature=0.8, max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for i in range(4):
        engine.abort(f"r{i}")
    assert_all_blocks_free(llm)
    assert not engine.has_unfinished_requests()


def test_logprobs_are_returned_for_each_token(tiny_llama):
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=64)
    out = llm.generate(prompts([12])[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                        ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and len(entry) >= 3
        assert entry[token] == max(entry.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs, strict=True)))
