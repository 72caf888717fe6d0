"""The engine client and its engine process: streams equal the offline result, clean errors,
abort on early exit, crash detection."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.replicas.engine.engine_client import EngineClient, EngineDeadError

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    model_dir = tiny_model_factory("llama-gqa-tied")
    eng = EngineClient(EngineConfig(model=str(model_dir), device="cpu", num_kvcache_blocks=64),
                        torch_threads=1)
    eng.model_dir = model_dir
    yield eng
    asyncio.run(eng.shutdown())


async def collect_counted(stream, pause_s: float = 0.0
                          ) -> tuple[str, list[int], str | None, int]:
    """The joined text, tokens, finish reason and number of deltas of `stream`; with
    `pause_s`, a consumer slower than the engine (it should get fewer, larger deltas)."""
    text, tokens, reason, items = "", [], None, 0
    async for delta in stream:
        items += 1
        for c in delta.outputs:
            text += c.text
            tokens += c.token_ids
            reason = c.finish_reason or reason
        if pause_s:
            await asyncio.sleep(pause_s)
    return text, tokens, reason, items


async def collect(stream) -> tuple[str, list[int], str | None]:
    return (await collect_counted(stream))[:3]


async def slow_collect(stream) -> tuple[str, list[int], str | None, int]:
    return await collect_counted(stream, pause_s=0.05)


def test_streams_equal_the_offline_result_also_for_slow_consumers(engine):
    prompt = "w5 w9 w100 w7"
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    offline = LLM(str(engine.model_dir), progress=False, device="cpu", num_kvcache_blocks=64)
    expected = offline.generate([prompt, prompt], [PARAMS, long], use_tqdm=False)

    async def main():
        fast = [await engine.add_request(prompt, PARAMS) for _ in range(3)]
        slow = await engine.add_request(prompt, long)
        return await asyncio.gather(*(collect(s) for s in fast)), await slow_collect(slow)

    fast, (text, tokens, reason, items) = asyncio.run(main())
    for result in fast:
        assert result == (expected[0].outputs[0].text, expected[0].outputs[0].token_ids, "length")
    assert (text, tokens, reason) == (expected[1].outputs[0].text,
                                      expected[1].outputs[0].token_ids, "length")
    assert items < 40  # the slow consumer's deltas carried several tokens each


def test_bad_input_is_a_value_error_and_leaving_early_frees_blocks(engine):
    """The engine goes on after bad input; a stream left early is aborted in the engine."""
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await engine.add_request("", PARAMS)
        with pytest.raises(ValueError, match="token id"):
            await engine.add_request([1, 10**9], PARAMS)
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        stream = await engine.add_request("w3 w4 w5", long)
        async for _ in stream:
            break
        await stream.aclose()
        return await engine.stats()

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert engine.stats_nowait().num_total_blocks == stats.num_total_blocks


def test_a_dead_engine_process_fails_streams_and_health(tiny_model_factory):
    model_dir = tiny_model_factory("llama-gqa-tied")
    eng = EngineClient(EngineConfig(model=str(model_dir), device="cpu", num_kvcache_blocks=64))

    async def main():
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        stream = await eng.add_request("w3 w4", long)
        eng._process.kill()
        with pytest.raises(EngineDeadError):
            await collect(stream)
        with pytest.raises(EngineDeadError):
            eng.check_health()
        with pytest.raises(EngineDeadError):
            await eng.add_request("w5", PARAMS)

    asyncio.run(main())
    asyncio.run(eng.shutdown())


def test_an_engine_that_cannot_start_raises(tmp_path):
    with pytest.raises(RuntimeError, match="failed to start"):
        EngineClient(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))


def test_a_delta_budget_paces_streams_without_changing_them(tiny_model_factory):
    """With `max_deltas_per_s`, deltas come at most that often (over all streams), each
    carrying the tokens of its interval, and the text and tokens are those of an unpaced run."""
    model_dir = tiny_model_factory("llama-gqa-tied")
    config = EngineConfig(model=str(model_dir), device="cpu", num_kvcache_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    expected = LLM(str(model_dir), progress=False, device="cpu", num_kvcache_blocks=64).generate(
        ["w5 w9 w100 w7", "w8 w2"], params, use_tqdm=False)
    rate = 10.0  # two streams: one delta per stream every 0.2 s
    eng = EngineClient(config, torch_threads=1, max_deltas_per_s=rate)

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        streams = [await eng.add_request(p, params) for p in ("w5 w9 w100 w7", "w8 w2")]
        results = await asyncio.gather(*(collect_counted(s) for s in streams))
        return results, loop.time() - start

    try:
        results, elapsed = asyncio.run(main())
    finally:
        asyncio.run(eng.shutdown())
    for (text, tokens, reason, items), want in zip(results, expected, strict=True):
        assert (text, tokens, reason) == (want.outputs[0].text, want.outputs[0].token_ids,
                                          "length")
        # the first delta comes at once, the last one unasked; in between one per 0.2 s
        assert items <= elapsed * rate / 2 + 2
        assert items < len(tokens)


class _BuiltEngine:
    """Stands in for a standby's already-built engine: only what `serve_engine` reads first."""

    served = False

    def stats(self) -> dict:
        return {}

    def has_unfinished_requests(self) -> bool:
        self.served = True
        return False


def test_an_engine_whose_server_left_before_ready_ends_quietly():
    from multiprocessing import Pipe

    from pagedserve.replicas.engine.engine_core import serve_engine

    ours, theirs = Pipe()
    theirs.close()  # the replica is gone before the engine says ready
    engine = _BuiltEngine()
    serve_engine(ours, {}, None, None, {}, engine=engine)  # returns: no BrokenPipeError
    assert not engine.served


class _BrokenEngine(_BuiltEngine):
    """An engine whose device fails at its first step."""

    def __init__(self) -> None:
        self.requests: set[str] = set()

    def add_request(self, request_id, prompt, params) -> None:
        self.requests.add(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self, stream):
        raise RuntimeError("simulated device failure")


def test_an_engine_that_fails_a_step_tells_its_client_why():
    from multiprocessing import Pipe

    from pagedserve.replicas.engine.engine_core import serve_engine

    ours, theirs = Pipe()
    theirs.send(("add", 0, "r", "w5 w6", PARAMS))
    with pytest.raises(RuntimeError, match="simulated device failure"):
        serve_engine(ours, {}, None, None, {}, engine=_BrokenEngine())
    messages = [theirs.recv() for _ in range(3)]
    assert [m[0] for m in messages] == ["ready", "result", "dead"]
    assert messages[1][2] is True  # the add itself succeeded
    assert "simulated device failure" in messages[2][1]
