"""Weights copied through the pinned staging ring, or straight from registered host memory,
land on the GPU bit for bit as a plain direct copy puts them there."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from gpu_models import write_gpu_model
from safetensors.torch import load_file

from pagedserve.replicas.models import device_copy, loader
from pagedserve.replicas.models.model_files import load_model_files
from pagedserve.replicas.models.shared_weights import SharedWeights, create_memfd, write_tensors

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


class DirectCopier:
    """The reference: every tensor with one plain `copy_`, no staging."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)


class CountingCopier(device_copy.DeviceCopier):
    """The staging copier with small buffers, counting its staged chunks."""

    chunks = 0

    def _copy_chunk(self, dst, src) -> None:
        CountingCopier.chunks += 1
        super()._copy_chunk(dst, src)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_gpu_model(tmp_path_factory.mktemp("gpu") / "m", "llama-mha-hd64-untied")


@pytest.fixture(scope="module")
def store(model_dir):
    """The checkpoint in a memfd, as the node's weight store keeps it."""
    fd = create_memfd()
    entries = write_tensors(fd, load_file(model_dir / "model.safetensors").items())
    yield SharedWeights(f"/proc/{os.getpid()}/fd/{fd}", entries)
    os.close(fd)


def _load(model_dir, dtype, copier, monkeypatch, tensors=None) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(loader, "DeviceCopier", copier)
    files = load_model_files(str(model_dir), progress=False)
    model = loader.load_model(files.spec, files.model_dir, dtype, CUDA, progress=False,
                              tensors=tensors)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("buffer_bytes", [512, 64 * 2**10])  # below one row / many rows
@pytest.mark.parametrize("source", ["files", "store"])
def test_staged_load_equals_a_direct_load(model_dir, store, monkeypatch, dtype, buffer_bytes,
                                          source):
    largest = max(e.nbytes for e in store.entries)
    assert largest > buffer_bytes * 4  # the large tensors go in chunks
    tensors = store.named_tensors if source == "store" else lambda: None
    direct = _load(model_dir, dtype, DirectCopier, monkeypatch, tensors())
    CountingCopier.chunks = 0
    staged = _load(model_dir, dtype, functools.partial(
        CountingCopier, buffer_bytes=buffer_bytes, num_buffers=2), monkeypatch, tensors())
    _assert_identical(staged, direct)
    assert CountingCopier.chunks > len(store.entries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_registered_mapping_loads_directly_and_equals_a_direct_load(model_dir, store,
                                                                      monkeypatch, dtype):
    mapped = list(store.named_tensors())
    assert device_copy.pin_in_place(mapped[0][1], read_only=True)
    assert all(t.is_pinned() for _, t in mapped)
    direct = _load(model_dir, dtype, DirectCopier, monkeypatch, store.named_tensors())
    CountingCopier.chunks = 0
    try:
        pinned = _load(model_dir, dtype, functools.partial(CountingCopier, buffer_bytes=2**20),
                       monkeypatch, mapped)
    finally:
        torch.cuda.cudart().cudaHostUnregister(mapped[0][1].untyped_storage().data_ptr())
    _assert_identical(pinned, direct)
    # Same dtype: no staging at all; another dtype: cast through the pinned buffers.
    assert (CountingCopier.chunks == 0) == (dtype == torch.float32)


def test_slices_and_views_go_through_small_buffers_intact():
    """A tensor-parallel rank's column slice (strided on the host) into a narrowed parameter,
    and rows larger than a buffer (split row by row)."""
    host = torch.randn(64, 512)
    param = torch.zeros(64, 384, device=CUDA)
    wide = torch.randn(3, 4096).to(torch.bfloat16)
    wide_param = torch.zeros(3, 4096, device=CUDA)
    with device_copy.DeviceCopier(CUDA, buffer_bytes=4096, num_buffers=2) as copy:
        copy(param.narrow(1, 0, 256), host[:, 256:])
        copy(wide_param, wide)  # a row is 16 KiB in float32: four buffers' worth
    assert torch.equal(param[:, :256].cpu(), host[:, 256:]) and not param[:, 256:].any()
    assert torch.equal(wide_param.cpu(), wide.float())
