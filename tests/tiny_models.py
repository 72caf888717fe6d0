"""Small random-weight Hugging Face checkpoints written to disk for tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TINY_VOCAB = 512

TINY_CONFIGS = {
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-gqa-tied-long": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=2048)),
    "llama-mha-untied-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        sliding_window=None)),
    "qwen2-gqa-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # 6 heads / 3 KV heads split three ways, and a vocabulary (512) that does not: tensor
    # parallelism pads the last vocabulary shard.
    "llama-6heads-tp3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=3, hidden_size=192, intermediate_size=384,
        tie_word_embeddings=False)),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a made-up vocabulary (no files needed from a hub)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, TINY_VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def write_tiny_model(out_dir: Path, name: str, seed: int = 0) -> Path:
    """Write a random-weight checkpoint (config, safetensors, tokenizer) for a TINY_CONFIGS entry."""
    config_cls, model_cls, extra = TINY_CONFIGS[name]
    shape = dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, config_cls)(**{**shape, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    _spread_weights(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


def _spread_weights(model: torch.nn.Module) -> None:
    """Random init gives near-uniform logits; larger weights make greedy choices clear-cut."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            elif param.dim() >= 1:
                param.normal_(0.0, 0.08 if param.dim() == 2 else 0.02)
