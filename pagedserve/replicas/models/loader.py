"""Build a model from a Hugging Face directory and stream its safetensors weights into it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from pagedserve.replicas.models.llama import LlamaForCausalLM
from pagedserve.replicas.models.spec import ModelSpec


def load_model(spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               progress: bool = True,
               tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> LlamaForCausalLM:
    """Create the model without initialising weights, then fill every parameter.

    The weights come from `tensors` (checkpoint names and tensors, e.g. from the object store)
    when given, else from the directory's safetensors files.
    """
    if tensors is None:
        tensors = read_safetensors(safetensors_files(model_dir), progress)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.model.rotary.build(device)
    _load_weights(model, tensors)
    return model.eval()


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's `*.safetensors` files, or FileNotFoundError naming the directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weight files")
    return files


def read_safetensors(files: list[Path], progress: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint files, one at a time, as `(name, tensor)`."""
    for path in tqdm(files, desc="Loading weights", unit="file", disable=not progress):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, f.get_tensor(name)


def _load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_checkpoint_names(model, params)
    loaded: set[str] = set()
    for name, tensor in tensors:
        if _load_one(model, params, name, tensor):
            loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s): {shown}")


def _load_one(model: LlamaForCausalLM, params: dict, name: str, tensor: torch.Tensor) -> bool:
    if "rotary_emb" in name or (name == "lm_head.weight" and model.spec.tie_word_embeddings):
        return False
    for ckpt_part, (our_part, shard) in model.packed_modules.items():
        if f".{ckpt_part}." in name:
            target = params[name.replace(ckpt_part, our_part)]
            view = _shard_view(model, target, our_part, shard)
            _check_shape(name, view, tensor)
            view.copy_(tensor)
            return True
    if name not in params:
        return False  # extra tensors (e.g. unused buffers) are ignored
    _check_shape(name, params[name], tensor)
    params[name].data.copy_(tensor)
    return True


def _shard_view(model, target: torch.Tensor, merged: str, shard) -> torch.Tensor:
    spec = model.spec
    if merged == "gate_up_proj":
        size = spec.intermediate_size
        return target.data.narrow(0, shard * size, size)
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard]
    return target.data.narrow(0, offset, size)


def _check_shape(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"weight {name} has shape {tuple(tensor.shape)}, the config expects {tuple(param.shape)}"
        )


def _expected_checkpoint_names(model: LlamaForCausalLM, params: dict) -> set[str]:
    names = set()
    for name in params:
        if name == "lm_head.weight" and model.spec.tie_word_embeddings:
            continue
        parts = [(ck, ours) for ck, (ours, _) in model.packed_modules.items() if f".{ours}." in name]
        if parts:
            names.update(name.replace(ours, ck) for ck, ours in parts)
        else:
            names.add(name)
    return names
