"""The shape of a supported model, read from its Hugging Face `config.json` and checked once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pagedserve.replicas.models.rope import NATIVE_ROPE_TYPES, rope_parameters

# Fields read from config.json itself; transformers' AutoConfig imports its model-specific
# modules, about a second of every engine start. When a field is missing, the class default
# decides, so AutoConfig is used after all: these fields' defaults differ from the generic ones.
_CORE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "rms_norm_eps", "max_position_embeddings")
_FIELDS_WITH_CLASS_DEFAULTS = {
    "LlamaForCausalLM": (),
    "MistralForCausalLM": ("num_key_value_heads", "sliding_window"),
    "Qwen2ForCausalLM": ("num_key_value_heads", "sliding_window", "use_sliding_window"),
    "Qwen3ForCausalLM": ("num_key_value_heads", "sliding_window", "use_sliding_window",
                         "head_dim"),
}

# architecture -> (bias on q/k/v, bias on o_proj when the config says `attention_bias`, q/k norm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": None, "o_bias": True, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "o_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "o_bias": False, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": None, "o_bias": True, "qk_norm": True},
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model and the KV cache need to know about one checkpoint."""

    hf_config: Any
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read and validate `model_dir/config.json`; raise a clear error for anything unsupported."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json")
    raw = _read_json(config_path)
    architecture = _architecture(raw, config_path)
    hf_config = _plain_config(raw, architecture) or _auto_config(model_dir)
    flags = SUPPORTED_ARCHITECTURES[architecture]
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    _check_heads(num_heads, num_kv_heads)
    return ModelSpec(
        hf_config=hf_config,
        architecture=architecture,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
        o_bias=attention_bias and flags["o_bias"],
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=flags["qk_norm"],
        sliding_window=_sliding_window(hf_config),
    )


def _read_json(config_path: Path) -> dict:
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err


def _plain_config(raw: dict, architecture: str) -> SimpleNamespace | None:
    """`config.json`'s fields as attributes, rotary parameters standardized; None when a field
    the engine reads is left to the class default or the rotary kind needs transformers."""
    needed = _CORE_FIELDS + _FIELDS_WITH_CLASS_DEFAULTS[architecture]
    rope = rope_parameters(raw)
    if any(k not in raw for k in needed) or rope is None or rope["rope_type"] not in NATIVE_ROPE_TYPES:
        return None
    return SimpleNamespace(**{**raw, "rope_parameters": rope})


def _auto_config(model_dir: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def _architecture(raw: dict, config_path: Path) -> str:
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ValueError(f"{config_path} names no architecture ('architectures' is missing)")
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(
            f"unsupported architecture {architectures[0]!r} in {config_path}; supported: {supported}"
        )
    return architectures[0]


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )


def _sliding_window(hf_config) -> int | None:
    window = getattr(hf_config, "sliding_window", None)
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    return int(window)
