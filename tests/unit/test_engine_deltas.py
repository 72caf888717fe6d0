"""The engine's outputs are deltas: each holds only what is new for its request, and the
deltas of a request join to the offline result, pipelined steps included."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.replicas.engine.engine_client import decode_delta, merge_deltas
from pagedserve.replicas.engine.engine_core import encode_delta

PROMPTS = [torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (40, 7, 23)]
CASES = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=7, max_tokens=12, logprobs=2, ignore_eos=True),
    SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, stop=["w1"]),
]


def joined_stream(llm: LLM, params: SamplingParams) -> dict:
    """Step with every request streamed; join each completion's deltas, counting finishes."""
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    joined: dict[tuple[str, int], dict] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(stream=True):
            for c in out.outputs:
                entry = joined.setdefault((out.request_id, c.index), {
                    "text": "", "token_ids": [], "logprobs": [], "finishes": 0})
                entry["text"] += c.text
                entry["token_ids"] += c.token_ids
                entry["logprobs"] += c.logprobs or []
                entry["finishes"] += c.finish_reason is not None
                entry["finish_reason"] = c.finish_reason
    return joined


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("params", CASES, ids=["greedy", "logprobs", "n2-stop"])
def test_streamed_deltas_join_to_the_offline_result(tiny_llama, params, pipelined):
    offline = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=128)
    expected = offline.generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=128)
    llm.engine.overlap_steps = pipelined  # tokens still on the device must not go out early
    joined = joined_stream(llm, params)
    for i, out in enumerate(expected):
        for c in out.outputs:
            got = joined[(f"r{i}", c.index)]
            assert (got["text"], got["token_ids"], got["finish_reason"]) == (
                c.text, c.token_ids, c.finish_reason)
            assert got["finishes"] == 1  # the finish reason goes out once
            if params.logprobs is not None:
                assert got["logprobs"] == c.logprobs
                assert all(t in lp for t, lp in zip(got["token_ids"], got["logprobs"],
                                                    strict=True))


def test_merged_deltas_hold_both_in_order():
    first = RequestOutput("r", None, [], [
        CompletionOutput(0, "a", [1], -0.5, [{1: -0.5}]), CompletionOutput(1, "x", [7])])
    second = RequestOutput("r", None, [], [
        CompletionOutput(0, "b", [2], -0.7, [{2: -0.2}], "length")], finished=False,
        num_cached_tokens=16)
    merged = merge_deltas(first, second)
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        (0, "ab", [1, 2], "length"), (1, "x", [7], None)]
    assert merged.outputs[0].logprobs == [{1: -0.5}, {2: -0.2}]
    assert merged.outputs[0].cumulative_logprob == -0.7 and merged.num_cached_tokens == 16


def test_prompt_logprobs_survive_the_wire_and_merges():
    scored = [None, {4: -0.5, 7: -1.0}]
    first = RequestOutput("r", None, [], [CompletionOutput(0, "a", [1])], prompt_logprobs=scored)
    second = RequestOutput("r", None, [], [CompletionOutput(0, "b", [2], finish_reason="length")],
                           finished=True)
    assert merge_deltas(first, second).prompt_logprobs == scored
    assert merge_deltas(second, first).prompt_logprobs == scored
    assert decode_delta(encode_delta(first)).prompt_logprobs == scored
    assert decode_delta(encode_delta(second)).prompt_logprobs is None
