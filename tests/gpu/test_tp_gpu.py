"""TP=2 (NCCL, two GPUs) against TP=1 greedy on a random-weight Llama of Llama-3.1-8B's shape.

    PYTHONPATH=. python -m pytest -q -s -m gpu tests/gpu/test_tp_gpu.py

Each engine runs in a fresh process (`in_fresh_process`), as a server's engine does: a rank 0
that served an earlier group cannot use symmetric memory with a new rank 1 (one test checks
that such a second engine still works, on NCCL).

float32 must agree token for token (the all-reduce only reorders float32 sums). bfloat16
rounds each partial sum, and a random-weight model's logits are nearly flat (its top 128K
log-probs lie within tenths of a nat), so greedy tokens can part at once on a near-tie. The
bfloat16 test therefore compares log-probabilities, on the steps where both engines saw the
same tokens: a sharding bug (a missing, doubled or misplaced shard) moves them by whole nats,
rounding by `BF16_LOGPROB_TOL` at most.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback

import pytest
import torch

from benchmarks import random_model
from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

LENGTHS = [1, 7, 40, 130]
MAX_TOKENS = 16
TOP_LOGPROBS = 5
BF16_LOGPROB_TOL = 0.25  # nats


def write_model(tmp_path_factory, shape: str):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    out = tmp_path_factory.mktemp(f"random-{shape}")
    model_dir = random_model.write_random_llama(out, shape, torch.bfloat16, device="cuda", seed=0)
    torch.cuda.empty_cache()  # the engines run in other processes: leave them this GPU's memory
    return model_dir


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
    completions = in_fresh_process(greedy_completions, str(model_dir), dtype, tp, enforce_eager)
    return [ids for ids, _, _ in completions]


def in_fresh_process(function, *args, timeout_s: float = 420.0):
    """`function(*args)` in a spawned process: it becomes the engines' rank 0 with no earlier
    tensor-parallel group behind it, as a server's engine process is."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=_run_and_report, args=(function, args, results))
    process.start()
    try:
        ok, value = results.get(timeout=timeout_s)
    finally:
        process.join(60)
        if process.is_alive():
            process.kill()
    if not ok:
        raise AssertionError(f"{function.__name__} failed in its process:\n{value}")
    return value


def _run_and_report(function, args, results) -> None:
    try:
        results.put((True, function(*args)))
    except BaseException:
        results.put((False, traceback.format_exc()))


def greedy_completions(model_dir: str, dtype: str, tp: int, enforce_eager: bool = False,
                       logprobs: int | None = None):
    """Greedy (ids, text, logprobs) of each of `make_prompts()`; prints the start-up phases
    (with -s).

    `max_num_seqs` is the prompt count, so only the few decode graphs these steps use are
    captured, not one for every batch size up to the default 256.
    """
    started = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, device="cuda", tensor_parallel_size=tp,
              progress=False, max_model_len=1024, gpu_memory_utilization=0.8,
              enforce_eager=enforce_eager, max_num_seqs=len(LENGTHS))
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in llm.engine.startup_phases.items())
    print(f"\n{dtype} TP={tp}: built in {time.perf_counter() - started:.1f} s ({phases})",
          flush=True)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                logprobs=logprobs)
        outputs = llm.generate(make_prompts(), params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].logprobs)
                for o in outputs]
    finally:
        llm.shutdown()


def two_tp2_engines_one_after_the_other(model_dir: str) -> list[list[list[int]]]:
    return [greedy_completions(model_dir, "float32", 2) for _ in range(2)]


def _agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@pytest.mark.timeout(300)
def test_tp2_with_decode_graphs_shuts_down_and_equals_eager_tp1(model_1b):
    """Shutdown used to hang in destroy_process_group while captured graphs held NCCL work."""
    assert _greedy(model_1b, "float32", 2) == _greedy(model_1b, "float32", 1, enforce_eager=True)


@pytest.mark.timeout(300)
def test_a_second_tp2_engine_in_one_process_builds_and_gives_the_same_ids(model_1b):
    """The second group cannot use symmetric memory (torch numbers its rendezvous per process)
    and must fall back to NCCL rather than wait forever for its new rank 1."""
    first, second = in_fresh_process(two_tp2_engines_one_after_the_other, str(model_1b))
    assert first == second


@pytest.mark.timeout(480)  # on expiry pytest-timeout prints every thread's stack
def test_tp2_equals_tp1_float32(model_8b):
    assert _greedy(model_8b, "float32", 2) == _greedy(model_8b, "float32", 1)


@pytest.mark.timeout(480)
def test_tp2_tracks_tp1_bfloat16(model_8b):
    single, split = (in_fresh_process(greedy_completions, str(model_8b), "bfloat16", tp, False,
                                      TOP_LOGPROBS) for tp in (1, 2))
    agreed, worst, tie_gaps = [], [], []
    for (ids_1, _, logprobs_1), (ids_2, _, logprobs_2) in zip(single, split, strict=True):
        parted = _agreement(ids_1, ids_2)
        agreed.append(parted)
        shared_steps = range(min(parted + 1, MAX_TOKENS))  # same tokens seen before each
        worst.append(max(_logprob_gap(logprobs_1[i], logprobs_2[i]) for i in shared_steps))
        if parted < MAX_TOKENS:  # each engine's pick must be a near-tie in the other's eyes
            a, b = ids_1[parted], ids_2[parted]
            first, second = logprobs_1[parted], logprobs_2[parted]
            tie_gaps += [first[a] - first.get(b, -float("inf")),
                         second[b] - second.get(a, -float("inf"))]
    print("bfloat16 tokens agreeing:", agreed,
          "largest log-prob gap on shared steps:", [f"{w:.4f}" for w in worst],
          "where tokens parted, each pick's lead in the other's log-probs:",
          [f"{g:.4f}" for g in tie_gaps])
    assert max(worst) <= BF16_LOGPROB_TOL
    assert all(g <= BF16_LOGPROB_TOL for g in tie_gaps)


def _logprob_gap(a: dict[int, float], b: dict[int, float]) -> float:
    """Largest log-prob difference over the tokens both top lists hold (they must share one)."""
    shared = a.keys() & b.keys()
    assert shared, (a, b)
    return max(abs(a[t] - b[t]) for t in shared)
