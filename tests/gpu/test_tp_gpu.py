"""TP=2 (NCCL, two GPUs) against TP=1 greedy on a random-weight Llama of Llama-3.1-8B's shape.

    PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_tp_gpu.py

float32 must agree token for token (the all-reduce only reorders float32 sums). bfloat16
rounds each partial sum, so a near-tie among 128K random logits can flip: tokens may part
late; the check is the one the bfloat16 CPU test against transformers uses.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from benchmarks import random_model
from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

LENGTHS = [1, 7, 40, 130]
MAX_TOKENS = 16


def write_model(tmp_path_factory, shape: str):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    out = tmp_path_factory.mktemp(f"random-{shape}")
    return random_model.write_random_llama(out, shape, torch.bfloat16, device="cuda", seed=0)


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory):
    return write_model(tmp_path_factory, "8b")


@pytest.fixture(scope="module")
def model_1b(tmp_path_factory):
    return write_model(tmp_path_factory, "1b")


def make_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(10, random_model.VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _greedy(model_dir, dtype: str, tp: int, enforce_eager: bool = False) -> list[list[int]]:
    return [c.token_ids for c in greedy_outputs(model_dir, dtype, tp, enforce_eager)]


def greedy_outputs(model_dir, dtype: str, tp: int, enforce_eager: bool = False) -> list:
    """Greedy completions of `make_prompts()`; prints the start-up phases (run with -s).

    `max_num_seqs` is the prompt count, so only the few decode graphs these steps use are
    captured, not one for every batch size up to the default 256.
    """
    started = time.perf_counter()
    llm = LLM(str(model_dir), dtype=dtype, device="cuda", tensor_parallel_size=tp,
              progress=False, max_model_len=1024, gpu_memory_utilization=0.8,
              enforce_eager=enforce_eager, max_num_seqs=len(LENGTHS))
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in llm.engine.startup_phases.items())
    print(f"\n{dtype} TP={tp}: built in {time.perf_counter() - started:.1f} s ({phases})")
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return [o.outputs[0] for o in llm.generate(make_prompts(), params, use_tqdm=False)]
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@pytest.mark.timeout(300)
def test_tp2_with_decode_graphs_shuts_down_and_equals_eager_tp1(model_1b):
    """Shutdown used to hang in destroy_process_group while captured graphs held NCCL work."""
    assert _greedy(model_1b, "float32", 2) == _greedy(model_1b, "float32", 1, enforce_eager=True)


@pytest.mark.timeout(480)  # on expiry pytest-timeout prints every thread's stack
def test_tp2_equals_tp1_float32(model_8b):
    assert _greedy(model_8b, "float32", 2) == _greedy(model_8b, "float32", 1)


@pytest.mark.timeout(480)
def test_tp2_tracks_tp1_bfloat16(model_8b):
    single, split = _greedy(model_8b, "bfloat16", 1), _greedy(model_8b, "bfloat16", 2)
    agreed = [_agreement(a, b) for a, b in zip(single, split, strict=True)]
    print("bfloat16 tokens agreeing before the first difference:", agreed)
    assert min(agreed) >= 1
    assert sum(agreed) >= 0.75 * MAX_TOKENS * len(LENGTHS)
