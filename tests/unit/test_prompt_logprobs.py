"""Prompt logprobs from the prefill: equal to transformers' log-softmax over the same ids, and
unchanged by chunked prefill, pipelined steps, a cached prefix, preemption or streaming."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_hf_equivalence import DEFAULT_PROMPTS, random_prompts
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams

ATOL = 1e-4  # float32: our kernels add in another order than transformers' (seen: 2e-5)
TOP_N = 3
SCORE = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP_N)
LENGTHS = [70, 1, 33, 17, 128, 2]


def hf_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """Row p: log-probs of the token after position p (float32)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches_transformers(model, prompt: list[int], scored) -> None:
    assert len(scored) == len(prompt) and scored[0] is None
    reference = hf_logprobs(model, prompt)
    for i in range(1, len(prompt)):
        entry, row = scored[i], reference[i - 1]
        assert entry[prompt[i]] == pytest.approx(row[prompt[i]].item(), abs=ATOL)
        top = row.topk(TOP_N)
        assert set(top.indices.tolist()) <= set(entry)  # the N largest are there
        assert len(entry) <= TOP_N + 1
        for token_id, logprob in entry.items():
            assert logprob == pytest.approx(row[token_id].item(), abs=ATOL)


def assert_same(outs, others) -> None:
    for a, b in zip(outs, others, strict=True):
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert x.keys() == y.keys()
            assert all(x[t] == pytest.approx(y[t], abs=ATOL) for t in x)


def tiny(tiny_llama, **kwargs) -> LLM:
    return LLM(str(tiny_llama), progress=False, device="cpu", **{"num_kvcache_blocks": 64,
                                                                  **kwargs})


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_baseline(tiny_llama, tiny_hf):
    prompts = random_prompts(LENGTHS, TINY_VOCAB, seed=5)
    outs = tiny(tiny_llama).generate(prompts, SCORE, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_transformers(tiny_hf, prompt, out.prompt_logprobs)
    return prompts, outs


def test_tiny_model_matches_transformers(tiny_baseline):
    prompts, outs = tiny_baseline
    assert [o.prompt_token_ids for o in outs] == prompts


def test_default_model_matches_transformers(default_model_dir, default_llm):
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir,
                                                           dtype=torch.float32).eval()
    outs = default_llm.generate(DEFAULT_PROMPTS, SCORE, use_tqdm=False)
    for out in outs:
        assert_matches_transformers(hf, out.prompt_token_ids, out.prompt_logprobs)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_chunked_prefill_gives_the_same_scores(tiny_llama, tiny_baseline, pipelined):
    prompts, expected = tiny_baseline
    # (and logits of 4 rows at a time: max_num_seqs bounds a chunk of them)
    llm = tiny(tiny_llama, max_num_batched_tokens=24, max_num_seqs=4)
    llm.engine.overlap_steps = pipelined
    assert_same(llm.generate(prompts, SCORE, use_tqdm=False), expected)


def test_preemption_gives_the_same_scores(tiny_llama, tiny_baseline):
    prompts, expected = tiny_baseline
    llm = tiny(tiny_llama, num_kvcache_blocks=14, max_num_batched_tokens=40)
    llm.engine.overlap_steps = True
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=TOP_N)
    assert_same(llm.generate(prompts, params, use_tqdm=False), expected)
    assert llm.engine.scheduler.num_preemptions > 0


def test_a_cached_prefix_is_computed_again_and_still_shared(tiny_llama, tiny_baseline):
    prompts, expected = tiny_baseline
    llm = tiny(tiny_llama)
    plain = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(prompts[0], plain, use_tqdm=False)  # caches the prompt's 4 full blocks
    scored = llm.generate(prompts[0], SCORE, use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    assert_same([scored], expected[:1])
    assert llm.generate(prompts[0], plain, use_tqdm=False)[0].num_cached_tokens == 64
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_max_tokens_0_returns_only_the_prompt_scores(tiny_llama, tiny_baseline, pipelined):
    prompts, expected = tiny_baseline
    llm = tiny(tiny_llama, max_num_batched_tokens=24)
    llm.engine.overlap_steps = pipelined
    params = SamplingParams(n=2, temperature=0, max_tokens=0, prompt_logprobs=TOP_N)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_same(outs, expected)
    for out in outs:
        assert [(c.token_ids, c.text, c.finish_reason) for c in out.outputs] == [
            ([], "", "length")] * 2
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_streamed_deltas_carry_the_scores_once_and_first(tiny_llama, tiny_baseline, pipelined):
    prompts, expected = tiny_baseline
    engine = tiny(tiny_llama, max_num_batched_tokens=24).engine
    engine.overlap_steps = pipelined
    params = SamplingParams(n=2, temperature=0, max_tokens=4, prompt_logprobs=TOP_N)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(stream=True):
            if out.prompt_logprobs is not None:
                assert out.request_id not in seen  # once
                seen[out.request_id] = out.prompt_logprobs
            else:
                assert out.request_id in seen  # the first delta had them
    assert_same([_Scored(seen[f"r{i}"]) for i in range(len(prompts))], expected)


class _Scored:
    def __init__(self, prompt_logprobs) -> None:
        self.prompt_logprobs = prompt_logprobs


def test_tensor_parallel_scores_like_one_rank(tiny_llama, tiny_baseline):
    prompts, expected = tiny_baseline
    llm = tiny(tiny_llama, tensor_parallel_size=2, max_num_batched_tokens=40, max_num_seqs=4)
    try:
        assert_same(llm.generate(prompts, SCORE, use_tqdm=False), expected)
    finally:
        llm.shutdown()
