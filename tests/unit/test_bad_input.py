"""Every bad input a user can send raises a clear ValueError or FileNotFoundError."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), progress=False, device="cpu", num_kvcache_blocks=64, max_model_len=128)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.5}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logprobs": 100}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x" * 10_000, "y" * 10_000]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": 7}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"temperature": None}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": True}, "n"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(3, 200))])
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_bad_token_ids_and_types(llm):
    with pytest.raises(ValueError, match="token id"):
        llm.generate([[5, -1]])
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate("w5", sampling_params={"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["w5", "w6"], [SamplingParams()])


def test_logit_bias_outside_the_vocabulary_is_refused_and_inside_it_steers(llm):
    vocab = llm.engine.spec.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias token id {vocab} is outside"):
        llm.generate("w5", SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = llm.generate("w5 w6", greedy, use_tqdm=False)[0].outputs[0].token_ids
    forced = llm.generate("w5 w6", SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logit_bias={vocab - 1: 100}),
        use_tqdm=False)[0].outputs[0].token_ids
    banned = llm.generate("w5 w6", SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logit_bias={plain[0]: -100}),
        use_tqdm=False)[0].outputs[0].token_ids
    assert forced == [vocab - 1] * 4
    assert banned[0] != plain[0] and plain[0] not in banned


def test_failed_batch_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate(["w5 w6", ""])  # the second prompt is bad: the first must not linger
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate("w5 w6", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"), progress=False, device="cpu")


def test_non_llama_architecture(tiny_llama, tmp_path):
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(model_dir), progress=False, device="cpu")


@pytest.mark.parametrize("missing, error, match", [
    ("config.json", FileNotFoundError, "config.json"),
    ("model.safetensors", FileNotFoundError, "safetensors"),
    ("tokenizer.json", FileNotFoundError, "tokenizer"),
])
def test_model_dir_missing_files(tiny_llama, tmp_path, missing, error, match):
    model_dir = tmp_path / "broken"
    shutil.copytree(tiny_llama, model_dir)
    (model_dir / missing).unlink()
    with pytest.raises(error, match=match):
        LLM(str(model_dir), progress=False, device="cpu", num_kvcache_blocks=16)


def test_bad_engine_settings():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="unknown_option"):
        EngineConfig(unknown_option=1)


def test_chat_rejects_malformed_messages(llm):
    with pytest.raises(ValueError, match="conversation"):
        llm.chat([{"content": "no role"}])
