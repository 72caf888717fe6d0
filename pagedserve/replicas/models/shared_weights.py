"""Checkpoint tensors handed to the engine's process in one shared-memory file.

The engine runs in a child process that is not a Ray worker, so it cannot read the object store
itself. The replica reads the store's arrays zero-copy and writes them once into a file in
`/dev/shm`; the engine maps that file and copies each tensor to its device (one host-to-device
copy per tensor). bfloat16 travels as uint16 bits (numpy has no bfloat16). torch is imported
only where tensors are made or read: the replica's own process packs numpy arrays alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SHM_DIR = "/dev/shm"
_ALIGN = 64  # keep every tensor's start aligned for vectorised copies


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SharedWeights:
    """A file of packed tensors plus where each one lies; picklable, cheap to send."""

    path: str
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor as a zero-copy view of the mapped file, in checkpoint order."""
        import torch

        size = os.path.getsize(self.path)
        if size == 0:
            return
        data = torch.from_file(self.path, shared=False, size=size, dtype=torch.uint8)
        for e in self.entries:
            dtype = getattr(torch, e.dtype)
            raw = data[e.offset:e.offset + e.nbytes]
            yield e.name, raw.view(dtype).view(e.shape)

    def unlink(self) -> None:
        """Remove the file; processes that mapped it keep their mapping."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (bfloat16 as its uint16 bits)."""
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy cannot hold it
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()


def pack(arrays: dict[str, tuple[np.ndarray, str]]) -> SharedWeights:
    """Write `{name: (array, torch dtype name)}` into one new shared-memory file."""
    entries, offset = [], 0
    for name, (array, dtype) in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        entries.append(TensorEntry(name, dtype, tuple(array.shape), offset, array.nbytes))
        offset += array.nbytes
    path = os.path.join(_shm_dir(offset), f"pagedserve-weights-{uuid.uuid4().hex}")
    with open(path, "wb") as f:
        f.truncate(offset)
        for entry, (array, _) in zip(entries, arrays.values(), strict=True):
            f.seek(entry.offset)
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    return SharedWeights(path, tuple(entries))


def _shm_dir(nbytes: int) -> str:
    """`/dev/shm` when it has room (memory-backed), else the temp directory."""
    if os.path.isdir(SHM_DIR) and shutil.disk_usage(SHM_DIR).free > 2 * nbytes:
        return SHM_DIR
    return tempfile.gettempdir()
