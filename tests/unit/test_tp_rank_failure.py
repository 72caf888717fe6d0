"""Killing one rank actor of a TP=2 replica under load (CPU, gloo, Serve handles, no HTTP).

In-flight streams must end with an error rather than hang, the replica must be replaced (its
health check fails), and requests after that must succeed on the new replica.
"""

from __future__ import annotations

import pytest
from tp_serving import check_rank_kill, kill_a_rank_under_load, served_app

pytestmark = pytest.mark.slow

LONG = {"model": "tiny", "prompt": "w5 w6 w7 w8", "max_tokens": 400, "temperature": 0,
        "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "w9 w10", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def tp_app(tiny_model_factory):
    model_dir = str(tiny_model_factory("llama-gqa-tied"))
    args = {"engine": {"model": model_dir, "device": "cpu", "tensor_parallel_size": 2,
                       "num_kvcache_blocks": 128, "max_num_seqs": 8},
            "served_model_name": "tiny", "replica_num_cpus": 1, "torch_threads": 1}
    with served_app(args, "pagedserve-tp-failure", num_cpus=6) as handles:
        yield handles


def test_killing_a_rank_fails_streams_and_replaces_the_replica(tp_app):
    check_rank_kill(kill_a_rank_under_load(*tp_app, LONG, SHORT), short_tokens=4)
