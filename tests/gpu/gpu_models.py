"""Tiny random-weight checkpoints whose head_dim (64) the Triton attention kernels take."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tiny_models import TINY_VOCAB, _spread_weights, tiny_tokenizer

GPU_CONFIGS = {
    "llama-gqa-hd64": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mha-hd64-untied": dict(num_attention_heads=4, num_key_value_heads=4,
                                  tie_word_embeddings=False),
}


def write_gpu_model(out_dir: Path, name: str, seed: int = 0) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        **GPU_CONFIGS[name],
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    _spread_weights(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
