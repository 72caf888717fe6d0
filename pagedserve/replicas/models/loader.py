"""Build a model from a Hugging Face directory and stream its safetensors weights into it.

Under tensor parallelism each rank reads only its slice of every split tensor (safetensors
reads a slice without loading the rest). On a GPU the copies run asynchronously
(`device_copy`): straight from pinned host memory, else through pinned staging buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from pagedserve.kernels import cpu_linear
from pagedserve.replicas.models.device_copy import DeviceCopier
from pagedserve.replicas.models.llama import LlamaForCausalLM
from pagedserve.replicas.models.spec import ModelSpec
from pagedserve.replicas.parallel.layers import TensorParallel, split_dims, vocab_shard_size


def load_model(spec: ModelSpec, model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               progress: bool = True, tp: TensorParallel | None = None,
               tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> LlamaForCausalLM:
    """Create the model without initialising weights, then fill every parameter.

    The weights come from `tensors` (checkpoint names and host tensors, e.g. mapped from the
    node's weight store) when given, else from the directory's safetensors files. With `tp`,
    only this rank's shard of each split weight is built and copied. A float32 model on a CPU
    gets its linear layers' weights packed for oneDNN (`cpu_linear`).
    """
    if tensors is not None:
        stored = ((name, TensorSlices(tensor)) for name, tensor in tensors)
    else:
        stored = read_safetensor_slices(safetensors_files(model_dir), progress)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, tp)
    _materialize(model, device, dtype)
    model.tie_weights()
    _zero_vocab_padding(model)
    model.model.rotary.build(device)
    # On a GPU the copies are asynchronous; leaving the block waits for them (one synchronize).
    with DeviceCopier(device) if device.type == "cuda" else nullcontext(_copy_on_host) as copy:
        _load_weights(model, stored, copy)
    cpu_linear.pack_model(model)  # float32 on a CPU only
    return model.eval()


def _materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device`, floating point
    ones in `dtype`: what `to_empty(device).to(dtype)` does, with one `torch.empty` each.
    (`to_empty` calls `empty_like` on meta tensors, which runs torch's Python reference
    implementation; its first use imports sympy and torch.fx's symbolic shapes, about 0.5 s on
    a CPU and seconds on a busy machine, at every engine start.)"""
    made: dict[int, torch.Tensor] = {}  # a tensor shared by two modules stays shared

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            kind = dtype if t.is_floating_point() else t.dtype
            made[id(t)] = torch.empty(t.shape, dtype=kind, device=device)
        return made[id(t)]

    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                module._parameters[name] = torch.nn.Parameter(empty(param),
                                                              requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = empty(buffer)


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
    for name, stored in read_safetensor_slices(files, progress):
        yield name, stored[:]


def read_safetensor_slices(files: list[Path], progress: bool = False) -> Iterator[tuple[str, object]]:
    """Every tensor of the checkpoint files as `(name, slice handle)`: nothing is read until
    the handle is indexed, so a tensor-parallel rank reads only its part."""
    for path in tqdm(files, desc="Loading weights", unit="file", disable=not progress):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, f.get_slice(name)


class TensorSlices:
    """A tensor in memory behind the interface of a safetensors slice handle."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]


def _copy_on_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _load_weights(model: LlamaForCausalLM, stored: Iterable[tuple[str, object]], copy) -> None:
    """Copy every checkpoint tensor into its parameter with `copy(dst, src)`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    dims = split_dims(model)
    expected = _expected_checkpoint_names(model, params)
    loaded: set[str] = set()
    for name, handle in stored:
        if _load_one(model, params, dims, name, handle, copy):
            loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s): {shown}")


def _load_one(model: LlamaForCausalLM, params: dict, dims: dict, name: str, stored,
              copy) -> bool:
    """Copy one checkpoint tensor (a safetensors slice handle) into its parameter, or skip it."""
    if "rotary_emb" in name or (name == "lm_head.weight" and model.spec.tie_word_embeddings):
        return False
    rank, ranks = (0, 1) if model.tp is None else (model.tp.rank, model.tp.size)
    for ckpt_part, (our_part, shard) in model.packed_modules.items():
        if f".{ckpt_part}." in name:
            target = params[name.replace(ckpt_part, our_part)]
            view = _shard_view(model, target, our_part, shard, ranks)
            full = stored.get_shape()
            _check_shape(name, view, [full[0] // ranks, *full[1:]])
            size = view.shape[0]  # this rank's rows of q, k, v, gate or up
            copy(view, stored[rank * size: (rank + 1) * size])
            return True
    if name not in params:
        return False  # extra tensors (e.g. unused buffers) are ignored
    param = params[name]
    dim = dims.get(name)
    if dim is None:
        _check_shape(name, param, stored.get_shape())
        copy(param.data, stored[:])
    else:
        _load_split(name, param, stored, dim, rank, ranks, copy)
    return True


def _load_split(name: str, param: torch.Tensor, stored, dim: int, rank: int, ranks: int,
                copy) -> None:
    """Read this rank's slice along `dim`; a padded last vocabulary shard keeps zeros past the end."""
    full = list(stored.get_shape())
    shard = param.shape[dim]
    others_match = full[:dim] + full[dim + 1:] == list(param.shape[:dim] + param.shape[dim + 1:])
    if not others_match or vocab_shard_size(full[dim], ranks) != shard:
        whole = list(param.shape)
        whole[dim] = f"{shard}x{ranks}"
        raise ValueError(f"weight {name} has shape {tuple(full)}, the config expects "
                         f"{tuple(whole)} (split along dimension {dim} over {ranks} ranks)")
    start, stop = min(rank * shard, full[dim]), min((rank + 1) * shard, full[dim])
    part = stored[start:stop] if dim == 0 else stored[:, start:stop]
    copy(param.data.narrow(dim, 0, stop - start), part)


def _zero_vocab_padding(model: LlamaForCausalLM) -> None:
    """Rows past the vocabulary (a padded last shard) are never loaded; make them zeros."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in split_dims(model):
        params[name].data.zero_()


def _shard_view(model, target: torch.Tensor, merged: str, shard, ranks: int) -> torch.Tensor:
    """Where checkpoint part `shard` of merged parameter `merged` sits in this rank's rows."""
    spec = model.spec
    if merged == "gate_up_proj":
        size = spec.intermediate_size // ranks
        return target.data.narrow(0, shard * size, size)
    q_size = spec.num_heads * spec.head_dim // ranks
    kv_size = spec.num_kv_heads * spec.head_dim // ranks
    offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard]
    return target.data.narrow(0, offset, size)


def _check_shape(name: str, param: torch.Tensor, shape) -> None:
    if tuple(param.shape) != tuple(shape):
        raise ValueError(
            f"weight {name} has shape {tuple(shape)}, the config expects {tuple(param.shape)}"
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
