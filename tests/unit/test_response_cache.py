"""The response cache's pure parts: keys, determinism, the L1 LRU+TTL, entries and replay."""

from __future__ import annotations

import os

import pytest

from pagedserve.cluster import cache_replay
from pagedserve.cluster.openai_responses import ChatResponseBuilder, CompletionResponseBuilder
from pagedserve.cluster.openai_streams import ChatStream, CompletionStream
from pagedserve.cluster.response_cache import (
    MemoryLRU,
    cache_key,
    is_deterministic,
    model_fingerprint,
)
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_key_changes_with_everything_that_changes_the_output():
    base = cache_key("m@abc", "chat", "alice", [[1, 2, 3]], SamplingParams(temperature=0))
    assert base == cache_key("m@abc", "chat", "alice", [[1, 2, 3]], SamplingParams(temperature=0))
    others = [
        cache_key("m@abd", "chat", "alice", [[1, 2, 3]], SamplingParams(temperature=0)),
        cache_key("m@abc", "completions", "alice", [[1, 2, 3]], SamplingParams(temperature=0)),
        cache_key("m@abc", "chat", "bob", [[1, 2, 3]], SamplingParams(temperature=0)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 4]], SamplingParams(temperature=0)),
        cache_key("m@abc", "chat", "alice", [[1, 2], [3]], SamplingParams(temperature=0)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]],
                  SamplingParams(temperature=0, max_tokens=17)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]], SamplingParams(temperature=0, n=2)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]],
                  SamplingParams(temperature=0, stop=["x"])),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]],
                  SamplingParams(temperature=0, logprobs=2)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]],
                  SamplingParams(temperature=0, repetition_penalty=1.1)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]],
                  SamplingParams(temperature=0, prompt_logprobs=2)),
        cache_key("m@abc", "chat", "alice", [[1, 2, 3]], SamplingParams(temperature=0),
                  {"echo": ["w1 w2"], "prompt_logprobs": None}),
    ]
    assert len({base, *others}) == len(others) + 1


def test_only_greedy_seeded_or_prompt_only_requests_are_deterministic():
    assert is_deterministic(SamplingParams(temperature=0))
    assert is_deterministic(SamplingParams(temperature=0.8, seed=7))
    assert is_deterministic(SamplingParams(temperature=0.8, max_tokens=0, prompt_logprobs=1))
    assert not is_deterministic(SamplingParams(temperature=0.8))


def test_fingerprint_changes_when_a_weight_file_changes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 10)
    first = model_fingerprint(tmp_path)
    assert first == model_fingerprint(tmp_path)
    weights.write_bytes(b"b" * 11)
    assert model_fingerprint(tmp_path) != first
    second = model_fingerprint(tmp_path)
    os.utime(weights, ns=(1, 1))  # same size, other file
    assert model_fingerprint(tmp_path) != second


def test_lru_evicts_the_least_recently_used_and_counts_bytes():
    lru = MemoryLRU(max_entries=2, ttl_s=60, clock=Clock())
    lru.put("a", b"1" * 10)
    lru.put("b", b"2" * 20)
    assert lru.get("a") == b"1" * 10  # a is now the most recent
    lru.put("c", b"3" * 30)
    assert lru.get("b") is None and lru.get("a") is not None and lru.get("c") is not None
    assert lru.nbytes == 40
    lru.put("c", b"4")
    assert lru.nbytes == 11 and len(lru) == 2


def test_entries_expire_after_the_ttl_and_hits_do_not_extend_it():
    clock = Clock()
    lru = MemoryLRU(max_entries=10, ttl_s=30, clock=clock)
    lru.put("a", b"x")
    clock.now += 29
    assert lru.get("a") == b"x"
    clock.now += 1
    assert lru.get("a") is None and lru.nbytes == 0
    lru.put("b", b"y", ttl_s=5)  # filled from L2 with 5 s left
    clock.now += 5
    assert lru.get("b") is None
    lru.put("c", b"z", ttl_s=0)
    assert lru.get("c") is None


def _delta(index: int, text: str, tokens: list[int], finish: str | None = None):
    out = CompletionOutput(index=index, text=text, token_ids=tokens, finish_reason=finish,
                           stop_reason=None)
    return RequestOutput("r", None, [1, 2, 3], [out], finished=finish is not None)


DELTAS = [_delta(0, "Hel", [5]), _delta(1, "Bon", [6]), _delta(0, "lo", [7], "stop"),
          _delta(1, "jour", [8, 9], "length")]


def _live(stream_cls, builder_cls):
    """The chunks of a live stream and the unary response of the same deltas."""
    stream = stream_cls("live", "m", 1, include_usage=True)
    chunks = [c for d in DELTAS for c in stream.on_delta(d)] + stream.finish(3)
    builder = builder_cls("live", "m", 1)
    for d in DELTAS:
        builder.add(d)
    return chunks, builder.response(3)


def _joined(chunks: list[dict], field) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + field(choice)
    return texts


@pytest.mark.parametrize("stream_cls, builder_cls, field", [
    (ChatStream, ChatResponseBuilder, lambda c: c["delta"].get("content", "")),
    (CompletionStream, CompletionResponseBuilder, lambda c: c["text"]),
])
def test_replayed_chunks_match_the_live_stream(stream_cls, builder_cls, field):
    live_chunks, unary = _live(stream_cls, builder_cls)
    stored = cache_replay.from_entry(cache_replay.to_entry(unary))
    assert "id" not in stored and "created" not in stored
    replay = cache_replay.replay_chunks(stored, "new", 2, include_usage=True)
    assert _joined(replay, field) == _joined(live_chunks, field) == {0: "Hello", 1: "Bonjour"}
    assert replay[-1]["usage"] == live_chunks[-1]["usage"] == unary["usage"]
    assert {c["object"] for c in replay} == {c["object"] for c in live_chunks}
    assert {c["id"] for c in replay} == {live_chunks[0]["id"].replace("live", "new")}
    finishes = [(c["index"], c["finish_reason"]) for chunk in replay for c in chunk["choices"]
                if c["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "length")]
    assert set(live_chunks[0]) == set(replay[0])  # same envelope, usage: null included
    refolded = builder_cls("new", "m", 2)
    for chunk in replay:
        refolded.add_chunk(chunk)
    assert refolded.response(3)["choices"] == unary["choices"]


def test_unary_hit_gets_a_fresh_id_and_created():
    _, unary = _live(ChatStream, ChatResponseBuilder)
    stored = cache_replay.from_entry(cache_replay.to_entry(unary))
    again = cache_replay.unary_response(stored, "fresh", 99)
    assert again["id"] == "chatcmpl-fresh" and again["created"] == 99
    assert {k: v for k, v in again.items() if k not in ("id", "created")} == \
        {k: v for k, v in unary.items() if k not in ("id", "created")}


def test_aborted_choices_are_flagged():
    stream = ChatStream("r", "m", 1)
    stream.on_delta(_delta(0, "x", [5], "abort"))
    assert stream.aborted
