"""A TP=2 Serve replica on two GPUs: rank 0 in the replica's engine process, rank 1 a Ray actor
on the second GPU, NCCL between them. Its greedy output must equal offline TP=1's, and killing
its rank actor under load must end the streams and bring a new replica up.

    PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_tp_serving_gpu.py
"""

from __future__ import annotations

import pytest
from test_tp_gpu import MAX_TOKENS, greedy_completions, in_fresh_process, make_prompts, write_model

pytestmark = pytest.mark.gpu

SERVED_NAME = "random-1b"
SERVED_MAX_MODEL_LEN = 8192  # room for streams long enough to be killed mid-way


@pytest.fixture(scope="module")
def served_tp2(tmp_path_factory):
    """(ingress, replica) handles of a TP=2 replica of the 1B model, and offline TP=1's texts.

    Offline TP=1 runs first, alone on the GPUs. The replica's placement group has one bundle of
    one GPU per rank: the replica's engine process is rank 0, rank 1 is a Ray actor.
    """
    pytest.importorskip("ray")
    from tp_serving import served_app

    model_1b = write_model(tmp_path_factory, "1b")
    expected = [text for _, text, _ in in_fresh_process(greedy_completions, str(model_1b),
                                                      "float32", 1)]
    args = {"engine": {"model": str(model_1b), "device": "cuda", "dtype": "float32",
                       "tensor_parallel_size": 2, "max_model_len": SERVED_MAX_MODEL_LEN,
                       "gpu_memory_utilization": 0.5},
            "served_model_name": SERVED_NAME, "replica_num_cpus": 2, "replica_num_gpus": 1}
    with served_app(args, "pagedserve-tp2-gpu", num_cpus=8) as handles:
        yield handles, expected


@pytest.mark.timeout(300)
def test_served_tp2_replica_equals_offline_tp1(served_tp2):
    (handle, replica), expected = served_tp2
    body = {"model": SERVED_NAME, "prompt": make_prompts(), "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}
    response = handle.completions.remote(body).result(timeout_s=120)
    choices = sorted(response["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == expected
    assert len(replica.stats.remote().result(timeout_s=30)["rank_workers"]) == 1


@pytest.mark.timeout(400)
def test_killing_a_rank_on_gpus_fails_streams_and_replaces_the_replica(served_tp2):
    """The CPU test's scenario with NCCL and decode CUDA graphs: a dead peer must not leave
    rank 0 waiting in a collective, and the new replica must get both GPUs back."""
    from tp_serving import check_rank_kill, kill_a_rank_under_load

    (handle, replica), _ = served_tp2
    prompt = make_prompts()[2]
    long = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": SERVED_MAX_MODEL_LEN - 100,
            "temperature": 0, "ignore_eos": True, "stream": True}
    short = {"model": SERVED_NAME, "prompt": prompt[:5], "max_tokens": 4, "temperature": 0,
             "ignore_eos": True}
    check_rank_kill(kill_a_rank_under_load(handle, replica, long, short), short_tokens=4)
