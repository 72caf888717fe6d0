"""Tensor parallelism on CPU (gloo): TP=N gives TP=1's greedy tokens; bad splits fail clearly.

Row-parallel layers sum partial products across ranks in another order than one matmul, so
logits differ in the last float32 bits; on these random-weight models greedy choices are
clear-cut enough that the tokens still agree for short generations.
"""

from __future__ import annotations

import pytest
from test_hf_equivalence import random_prompts
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams

LENGTHS = [1, 5, 17, 40, 3, 64]
MAX_TOKENS = 12


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _tp_tokens(model_dir, tp: int, prompts) -> list[list[int]]:
    llm = LLM(str(model_dir), progress=False, device="cpu", num_kvcache_blocks=64,
              tensor_parallel_size=tp)
    try:
        return _greedy(llm, prompts)
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("name", "tp"), [
    ("llama-gqa-tied", 2),  # tied embeddings: the LM head shares the vocab-parallel embedding
    ("qwen2-gqa-bias", 2),  # column-parallel QKV bias
    ("llama-6heads-tp3", 3),  # padded last vocabulary shard
])
def test_tensor_parallel_matches_single_rank(tiny_model_factory, name, tp):
    model_dir = tiny_model_factory(name)
    prompts = random_prompts(LENGTHS, TINY_VOCAB)
    single = LLM(str(model_dir), progress=False, device="cpu", num_kvcache_blocks=64)
    assert _tp_tokens(model_dir, tp, prompts) == _greedy(single, prompts)


def test_heads_that_do_not_split_fail_with_the_numbers(default_model_dir):
    # SmolLM2-135M: 9 attention heads, 3 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .*\(9\).*\(3\).*\[1, 3\]"):
        LLM(str(default_model_dir), progress=False, device="cpu", tensor_parallel_size=2)


def test_default_model_tp3_matches_tp1(default_model_dir, default_llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    tokenizer = default_llm.get_tokenizer()
    ids = [tokenizer.encode(p) for p in prompts]
    llm = LLM(str(default_model_dir), progress=False, device="cpu", tensor_parallel_size=3,
              num_kvcache_blocks=64)
    try:
        assert _greedy(llm, ids) == _greedy(default_llm, ids)
    finally:
        llm.shutdown()


def test_one_shot_all_reduce_is_for_gpus_only(monkeypatch):
    """On CPU (gloo) and with PAGEDSERVE_TP_ALL_REDUCE=nccl the group keeps its plain all-reduce;
    the GPU path is checked against NCCL in tests/gpu/test_symmetric_all_reduce.py."""
    import torch

    from pagedserve.replicas.parallel import symmetric_all_reduce
    from pagedserve.replicas.parallel.layers import TensorParallel

    cpu = TensorParallel(0, 2, torch.device("cpu"))
    cpu.use_one_shot_all_reduce(torch.float32)  # returns before any collective
    assert cpu.one_shot is None
    monkeypatch.setenv("PAGEDSERVE_TP_ALL_REDUCE", "nccl")
    assert not symmetric_all_reduce.enabled()
    gpu = TensorParallel(0, 2, torch.device("cuda", 0))
    gpu.use_one_shot_all_reduce(torch.bfloat16)  # disabled: no collective, no CUDA call
    assert gpu.one_shot is None
