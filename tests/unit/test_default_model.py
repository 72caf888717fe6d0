"""The embedded default model answers through `LLM()`, `chat` and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import needs_default_model

from pagedserve import LLM, SamplingParams
from pagedserve.cli import main as cli_main

GREEDY16 = SamplingParams(temperature=0, max_tokens=16)


@needs_default_model
def test_chat_answers_paris(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY16,
                           use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on the chat template's end-of-turn token


@needs_default_model
def test_llm_without_arguments_loads_the_default(default_model_dir):
    llm = LLM(progress=False, device="cpu", num_kvcache_blocks=32)
    assert llm.engine.model_dir == default_model_dir
    assert llm.engine.spec.num_layers == 30 and llm.engine.spec.num_kv_heads == 3
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)[0]
    assert out.outputs[0].text.strip()


@needs_default_model
def test_cli_generate_prints_the_answer(default_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "generate", "What is the capital of France?",
         "--max-tokens", "16"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_rejects_bad_arguments_with_a_message(capsys):
    assert cli_main(["generate", "hi", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert cli_main(["generate", "hi", "--model", "/does/not/exist"]) == 2
    assert "does not exist" in capsys.readouterr().err


@needs_default_model
def test_a_gguf_file_path_loads_through_the_conversion_cache(default_model_dir):
    from pagedserve.replicas.models.default_model import find_default_gguf

    llm = LLM(str(find_default_gguf()), progress=False, device="cpu", num_kvcache_blocks=32)
    assert llm.engine.model_dir == default_model_dir  # same file, same cached conversion
    with pytest.raises(ValueError, match="not a .gguf"):
        LLM(str(default_model_dir / "config.json"), progress=False, device="cpu")
