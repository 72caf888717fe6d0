"""Greedy tokens from our engine equal transformers' greedy `generate`, token for token."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import TINY_CONFIGS, TINY_VOCAB

from pagedserve import LLM, SamplingParams

PROMPT_LENGTHS = [1, 5, 17, 40, 3, 64, 100, 16, 33]
MAX_TOKENS = 24


def hf_greedy(model, prompt: list[int], max_tokens: int, stop_at_eos: bool) -> list[int]:
    kwargs = {} if stop_at_eos else {"eos_token_id": None, "min_new_tokens": max_tokens}
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_match_transformers(tiny_model_factory, name):
    model_dir = tiny_model_factory(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(str(model_dir), progress=False, device="cpu", num_kvcache_blocks=128)
    prompts = random_prompts(PROMPT_LENGTHS, TINY_VOCAB)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)  # all lengths batched together
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS, stop_at_eos=False)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors:",
    "1, 2, 3, 4,",
    "Translate to French: I like cheese.",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. Then",
]


def test_default_model_matches_transformers(default_model_dir, default_llm):
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = default_llm.get_tokenizer()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}],
                                         tokenize=False, add_generation_prompt=True)
    texts = [*DEFAULT_PROMPTS, chat]
    outs = default_llm.generate(texts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for text, out in zip(texts, outs, strict=True):
        prompt = tokenizer.encode(text)
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16, stop_at_eos=True), text


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen3-qknorm"])
def test_bfloat16_on_cpu_tracks_transformers_bfloat16(tiny_model_factory, name):
    """bf16 rounding differs between implementations, so tokens may part late, never early."""
    model_dir = tiny_model_factory(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    llm = LLM(str(model_dir), dtype="bfloat16", progress=False, device="cpu", num_kvcache_blocks=128)
    prompts = random_prompts(PROMPT_LENGTHS, TINY_VOCAB)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    agreed = []
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        ref = hf_greedy(hf, prompt, MAX_TOKENS, stop_at_eos=False)
        ours = out.outputs[0].token_ids
        agreed.append(next((i for i, (a, b) in enumerate(zip(ref, ours, strict=True)) if a != b), MAX_TOKENS))
    assert min(agreed) >= 1  # the first token (from prefill) always agrees
    assert sum(agreed) >= 0.75 * MAX_TOKENS * len(prompts)
