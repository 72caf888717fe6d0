"""The asyncio engine: delta streams, abort on early exit, errors at add time."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.replicas.engine.async_engine import AsyncEngine

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def async_engine(tiny_llama):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama), device="cpu", num_kvcache_blocks=64),
                                     progress=False)
    yield engine
    asyncio.run(engine.shutdown())


async def collect(stream) -> tuple[str, list[int], str | None]:
    text, tokens, reason = "", [], None
    async for delta in stream:
        for c in delta.outputs:
            text += c.text
            tokens += c.token_ids
            reason = c.finish_reason or reason
    return text, tokens, reason


def test_streamed_deltas_concatenate_to_the_offline_result(tiny_llama, async_engine):
    prompt = "w5 w9 w100 w7"
    expected = LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=64).generate(
        prompt, PARAMS, use_tqdm=False)[0].outputs[0]

    async def main():
        streams = [await async_engine.add_request(prompt, PARAMS) for _ in range(3)]
        return await asyncio.gather(*(collect(s) for s in streams))

    for text, tokens, reason in asyncio.run(main()):
        assert (text, tokens, reason) == (expected.text, expected.token_ids, "length")


def test_leaving_a_stream_early_aborts_and_frees_blocks(async_engine):
    bm = async_engine.engine.block_manager

    async def main():
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = await async_engine.add_request("w3 w4 w5", long, request_id="leaver")
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0.05)
        return await async_engine.stats()

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert bm.num_free_blocks == bm.num_blocks
    assert "leaver" not in async_engine.engine.requests


def test_bad_input_raises_at_add_and_engine_keeps_serving(async_engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await async_engine.add_request("", PARAMS)
        with pytest.raises(ValueError, match="token id"):
            await async_engine.add_request([1, 10**9], PARAMS)
        return await collect(await async_engine.add_request("w5 w6", PARAMS))

    text, tokens, reason = asyncio.run(main())
    assert len(tokens) == 12 and reason == "length"


def test_a_crashed_engine_fails_its_streams_and_refuses_new_work(async_engine, monkeypatch):
    from pagedserve.replicas.engine.async_engine import EngineDeadError

    def broken_step(**kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(async_engine.engine, "step", broken_step)

    async def main():
        stream = await async_engine.add_request("w5 w6", PARAMS)
        with pytest.raises(EngineDeadError, match="simulated device failure"):
            await collect(stream)
        assert not async_engine.is_running
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("w7", PARAMS)

    asyncio.run(main())
