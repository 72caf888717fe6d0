"""Convert a llama-architecture GGUF file into a Hugging Face-style model directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_MISSING = object()


def is_converted_dir(path: str | Path) -> bool:
    """Return True when `path` holds every file a conversion writes."""
    path = Path(path)
    return all((path / name).is_file() for name in REQUIRED_FILES)


def convert_gguf_to_hf_dir(
    gguf_path: str | Path, out_dir: str | Path, progress: bool = True
) -> Path:
    """Dequantize a llama GGUF file to float32 and write config, weights and tokenizer to `out_dir`.

    The directory is built next to `out_dir` and renamed into place, so a reader never sees a
    half-written model. An existing complete `out_dir` is returned as is.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if is_converted_dir(out_dir):
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but is not a complete converted model; remove it")
    reader = gguf.GGUFReader(gguf_path)
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {arch!r} (expected 'llama')")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_model_dir(reader, gguf_path, tmp, progress)
        _make_readable(tmp)
        os.rename(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # The rename fails when another process finished the same conversion first.
        if isinstance(exc, OSError) and is_converted_dir(out_dir):
            return out_dir
        raise
    return out_dir


def _make_readable(directory: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; a cache may be shared between users.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _write_model_dir(reader: gguf.GGUFReader, gguf_path: Path, out: Path, progress: bool) -> None:
    hparams = _read_hparams(reader)
    tensors = _convert_tensors(reader, hparams, progress)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tie = "lm_head.weight" not in tensors
    _write_config(hparams, out, vocab_size=tensors["model.embed_tokens.weight"].shape[0], tie=tie)
    _write_tokenizer(gguf_path, hparams, out)


def _meta(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata is missing {key!r}")
        return default
    return field.contents()


def _read_hparams(reader: gguf.GGUFReader) -> dict[str, Any]:
    heads = int(_meta(reader, "llama.attention.head_count"))
    hidden = int(_meta(reader, "llama.embedding_length"))
    return {
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_meta(reader, "llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_meta(reader, "llama.context_length")),
        "rms_norm_eps": float(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(reader, "llama.rope.freq_base", 10000.0)),
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id", None),
    }


def _convert_tensors(
    reader: gguf.GGUFReader, hparams: dict[str, Any], progress: bool
) -> dict[str, torch.Tensor]:
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="Converting GGUF", unit="tensor", disable=not progress):
        hf_name = hf_tensor_name(tensor.name)
        weights = _dequantize(tensor)
        if ".attn_q." in tensor.name:
            weights = reverse_permute(weights, hparams["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weights = reverse_permute(weights, hparams["num_key_value_heads"])
        # F32 tensors come back as read-only views of the memory-mapped file; copy those.
        tensors[hf_name] = torch.from_numpy(np.require(weights, np.float32, ["C", "W"]))
    return tensors


def hf_tensor_name(name: str) -> str:
    """Map a llama.cpp tensor name (`blk.3.attn_q.weight`) to its Hugging Face Llama name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    try:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}"
        ) from exc
    torch_shape = tuple(int(d) for d in reversed(tensor.shape))
    return weights.reshape(torch_shape)


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k projection (rows grouped per head)."""
    half = weights.shape[0] // n_head // 2
    permuted = weights.reshape(n_head, half, 2, *weights.shape[1:])
    return permuted.swapaxes(1, 2).reshape(weights.shape)


# transformers is imported inside the writers: it takes seconds to import and a cached model
# directory never needs it here.
def _write_config(hparams: dict[str, Any], out: Path, vocab_size: int, tie: bool) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
        dtype="float32",
        **hparams,
    )
    config.save_pretrained(out)
    # transformers 5 writes `dtype` and `rope_parameters`; keep the 4.x keys for older readers.
    path = out / "config.json"
    data = json.loads(path.read_text())
    data.update(rope_theta=hparams["rope_theta"], torch_dtype="float32")
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(gguf_path: Path, hparams: dict[str, Any], out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)
    eos_ids = [tokenizer.eos_token_id, hparams["eos_token_id"]]
    eos_ids = list(dict.fromkeys(int(i) for i in eos_ids if i is not None))
    bos_id = hparams["bos_token_id"]
    if bos_id is None:
        bos_id = tokenizer.bos_token_id
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids).save_pretrained(out)
