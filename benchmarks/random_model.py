"""Random-weight Llama checkpoints of real model shapes, written as safetensors directories.

Throughput does not depend on weight values, so a random model of Llama-3.2-1B's or
Llama-3.1-8B's shape measures what those models would, with nothing fetched from a hub. Both our
engine and the transformers peers load the same directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False),
}
VOCAB = 128256


def write_random_llama(out_dir: Path, shape: str, dtype: torch.dtype = torch.bfloat16,
                       device: str = "cpu", seed: int = 0) -> Path:
    """Write config.json, model.safetensors and a word-level tokenizer for `shape`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _config(shape)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator(device=device).manual_seed(seed)
    save_file(_weights(config, dtype, device, g), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    _tokenizer().save_pretrained(out_dir)
    return out_dir


def _config(shape: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE, "head_dim": 64 if shape == "1b" else 128,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", **SHAPES[shape],
    }


def _weights(c: dict, dtype, device, g) -> dict[str, torch.Tensor]:
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim

    def rand(*shape):  # std 0.02, like the usual initialisation
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(
            dtype).cpu()

    ones = torch.ones(hidden, dtype=dtype)
    weights = {"model.embed_tokens.weight": rand(VOCAB, hidden), "model.norm.weight": ones}
    if not c["tie_word_embeddings"]:
        weights["lm_head.weight"] = rand(VOCAB, hidden)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": rand(q, hidden),
            p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, q),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": ones.clone(),
            p + "post_attention_layernorm.weight": ones.clone(),
        })
    return weights


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer covering the whole vocabulary (ids 0-2 are unk/bos/eos)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


if __name__ == "__main__":  # python benchmarks/random_model.py OUT_DIR [--shape 8b]
    parser = argparse.ArgumentParser(description="write a random-weight Llama checkpoint")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="8b")
    parser.add_argument("--device", default="cpu", help="where to draw the weights (cuda: faster)")
    cli = parser.parse_args()
    print(write_random_llama(cli.out_dir, cli.shape, device=cli.device))
