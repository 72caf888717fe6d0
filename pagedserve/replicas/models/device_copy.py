"""Copies of host tensors to a CUDA device: directly from pinned memory, else through a small
ring of pinned staging buffers.

A copy from pageable memory cannot run asynchronously: CUDA stages it through a pinned buffer
of its own while the CPU waits. Here the CPU fills one of our pinned buffers (casting to the
destination's dtype on the way) while the GPU copies the previous one on a side stream, so the
host's work overlaps the transfers. The fill is the slow part, so a few threads share it (an
engine in a Ray replica may run torch with one thread). A buffer is refilled only once the
event recorded after its last copy has completed. A tensor larger than a buffer goes in chunks
of whole rows (row by row, recursively, when even one row is larger), which also serves a
tensor-parallel rank's slice of a host tensor and the packed q/k/v and gate/up views of a
parameter.

Host memory already pinned in the destination's dtype (e.g. a standby's registered mapping of
the weight store) is copied directly and asynchronously. Leaving `DeviceCopier`'s block waits
for every copy (one device synchronize) and releases the buffers.
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

BUFFER_BYTES = 64 * 2**20
NUM_BUFFERS = 4
FILL_THREADS = 4  # host threads that fill one staging buffer
MIN_SPLIT_BYTES = 4 * 2**20  # a smaller fill is not worth splitting
REGISTER_PORTABLE = 0x01  # cudaHostRegisterPortable: pinned for every GPU of the process
REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads the memory


def plan_chunks(num_rows: int, row_bytes: int, buffer_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row ranges `[start, stop)` covering `num_rows` rows of `row_bytes` each, as
    few as possible with at most `buffer_bytes` in each; [] when one row alone does not fit."""
    if row_bytes > buffer_bytes:
        return []
    per_chunk = buffer_bytes // row_bytes if row_bytes else max(num_rows, 1)
    return [(start, min(start + per_chunk, num_rows)) for start in range(0, num_rows, per_chunk)]


def pin_in_place(tensor: torch.Tensor, read_only: bool = False) -> bool:
    """Register the memory under `tensor` (its whole storage) as pinned, so copies from it to a
    GPU run asynchronously with no staging. Portable: a standby pins before it knows which GPU
    its replica has. `read_only`: the memory is mapped read-only (CUDA then only reads it).
    False, with the reason logged, when CUDA refuses."""
    storage = tensor.untyped_storage()
    flags = REGISTER_PORTABLE | (REGISTER_READ_ONLY if read_only else 0)
    status = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), flags)
    if int(status) != 0:
        _forget_cuda_error()
        logger.warning("could not pin %.2f GiB of host memory in place (cudaHostRegister: "
                       "%s); copies from it will be staged", storage.nbytes() / 2**30,
                       torch.cuda.cudart().cudaGetErrorString(status))
        return False
    return True


def _forget_cuda_error() -> None:
    """A failed runtime call stays the thread's last error, and torch reports that at its next
    kernel launch as the kernel's failure: read it now (cudaGetLastError also clears it)."""
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "libcudart.so" in line}
    for library in libraries:
        ctypes.CDLL(library).cudaGetLastError()


class DeviceCopier:
    """`copier(dst, src)` copies host tensor `src` into CUDA tensor `dst` of the same shape,
    asynchronously (see the module docstring); use it as a context manager."""

    def __init__(self, device: torch.device, buffer_bytes: int = BUFFER_BYTES,
                 num_buffers: int = NUM_BUFFERS) -> None:
        self.device, self.buffer_bytes = device, buffer_bytes
        self.stream = torch.cuda.Stream(device)
        # The destinations were allocated (and some zeroed) on the current stream.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._pinned = [False] * num_buffers
        self._events: list[torch.cuda.Event | None] = [None] * num_buffers
        self._next = 0
        self._fillers = ThreadPoolExecutor(FILL_THREADS, thread_name_prefix="weight-staging")

    def __enter__(self) -> DeviceCopier:
        return self

    def __exit__(self, *exc) -> None:
        self._fillers.shutdown()
        torch.cuda.synchronize(self.device)  # every copy, staged or direct, has landed
        for buffer, pinned in zip(self._buffers, self._pinned, strict=True):
            if pinned:
                torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        self._buffers = [None] * len(self._buffers)
        self._pinned = [False] * len(self._buffers)

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"cannot copy a tensor of shape {tuple(src.shape)} into one of "
                             f"shape {tuple(dst.shape)}")
        if src.is_pinned() and src.dtype == dst.dtype:
            dst.copy_(src, non_blocking=True)
        elif dst.numel():
            self._staged(dst.reshape(1) if dst.dim() == 0 else dst,
                         src.reshape(1) if src.dim() == 0 else src)

    def _staged(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        row_bytes = dst[0].numel() * dst.element_size()
        chunks = plan_chunks(dst.shape[0], row_bytes, self.buffer_bytes)
        if not chunks:  # one row is larger than a buffer: copy its rows one by one
            for row in range(dst.shape[0]):
                self._staged(dst[row], src[row])
            return
        for start, stop in chunks:
            self._copy_chunk(dst[start:stop], src[start:stop])

    def _copy_chunk(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # its previous copy has left the buffer
        nbytes = dst.numel() * dst.element_size()
        staged = self._buffer(slot)[:nbytes].view(dst.dtype).view(dst.shape)
        self._fill(staged, src)
        with torch.cuda.stream(self.stream):
            dst.copy_(staged, non_blocking=True)
            self._events[slot] = torch.cuda.Event()
            self._events[slot].record(self.stream)

    def _fill(self, staged: torch.Tensor, src: torch.Tensor) -> None:
        """`staged.copy_(src)` (gathering a strided slice, casting to the parameter's dtype),
        its rows shared among the filler threads."""
        nbytes = staged.numel() * staged.element_size()
        parts = plan_chunks(staged.shape[0], nbytes // staged.shape[0],
                            max(MIN_SPLIT_BYTES, -(-nbytes // FILL_THREADS)))
        if len(parts) <= 1:
            staged.copy_(src)
            return
        for done in [self._fillers.submit(staged[a:b].copy_, src[a:b]) for a, b in parts]:
            done.result()

    def _buffer(self, slot: int) -> torch.Tensor:
        """Buffer `slot`, pinned on first use. Plain memory registered with CUDA, not the
        pinned allocator's: that one would keep the buffers for the process's whole life.
        (Should CUDA refuse, the buffer stays pageable: its copies are then synchronous.)"""
        if self._buffers[slot] is None:
            self._buffers[slot] = torch.empty(self.buffer_bytes, dtype=torch.uint8)
            self._pinned[slot] = pin_in_place(self._buffers[slot])
        return self._buffers[slot]
