"""Checkpoint tensors in one anonymous shared-memory file, readable by processes that are not
Ray workers.

The node's weight store writes every tensor of the checkpoint once, in its own dtype, into a
memfd it owns (`create_memfd`, `write_tensors`). An engine process (spawned by a replica, so not
a Ray worker: it cannot read Ray's object store) and a host-mode standby map that file
read-only through `/proc/<store pid>/fd/<fd>` and copy each tensor to their device from the
mapping: the node holds the weights once, and nothing is staged in `/dev/shm`. The file has no
path, so a killed store leaves nothing behind; its memory is freed once the store and every
mapping are gone. torch is imported only where tensors are written or read.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MEMFD_NAME = "pagedserve-weights"  # how the mapping shows in /proc/<pid>/maps
_ALIGN = 64  # keep every tensor's start aligned for vectorised copies
_WRITE_BYTES = 2**30  # one write call's most (Linux writes at most ~2 GiB at once)
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SharedWeights:
    """Where to open another process's file of packed tensors, and where each tensor lies in
    it; picklable, cheap to send.

    The memory belongs to the process that wrote it (the weight store), which keeps it for its
    whole life: a reader maps it and has nothing to release.
    """

    path: str
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor as a zero-copy, read-only view of the mapped file, in checkpoint order.
        The mapping lasts as long as any of the views."""
        import torch

        size = max((e.offset + e.nbytes for e in self.entries), default=0)
        data = _map_read_only(self.path, size) if size else torch.empty(0, dtype=torch.uint8)
        for e in self.entries:
            raw = data[e.offset:e.offset + e.nbytes]
            yield e.name, raw.view(getattr(torch, e.dtype)).view(e.shape)


def create_memfd() -> int:
    """A new anonymous shared-memory file that can be sealed once written."""
    return os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def write_tensors(fd: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[TensorEntry, ...]:
    """Write each `(name, tensor)`'s bytes, in the tensor's own dtype, at the next aligned
    offset of `fd`, then seal it: readers can trust that what they map never changes size or
    content."""
    entries, offset = [], 0
    for name, tensor in tensors:
        offset = -(-offset // _ALIGN) * _ALIGN
        raw = memoryview(_bytes_of(tensor)).cast("B")
        _write_all(fd, raw, offset)
        entries.append(TensorEntry(name, str(tensor.dtype).removeprefix("torch."),
                                   tuple(tensor.shape), offset, len(raw)))
        offset += len(raw)
    os.ftruncate(fd, offset)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    return tuple(entries)


def _bytes_of(tensor: torch.Tensor):
    """The tensor's bytes as a numpy array (any dtype, bfloat16 included: numpy has none)."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _WRITE_BYTES], offset + done)


def _map_read_only(path: str, size: int) -> torch.Tensor:
    """The file's first `size` bytes as a uint8 tensor over a shared, read-only mapping."""
    import torch

    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping keeps the file open
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor read-only; the mapping itself refuses writes.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)
