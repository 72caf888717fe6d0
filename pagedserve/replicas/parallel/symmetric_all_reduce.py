"""All-reduce of small GPU tensors through symmetric memory (one-shot), NCCL for the rest.

A decode step runs two all-reduces per layer of at most a few MB each ([batch, hidden]), where
NCCL's latency dominates: on two H200s one took 17.5 us at batch 1 and 35.5 us at batch 256
inside a CUDA graph, against 7.5 and 20.5 us for torch's symmetric-memory one-shot kernel, in
which each GPU reads its peers' buffers over NVLink and sums them (`benchmarks/tp_overheads.py`).
Prefill chunks, larger than the buffer, keep NCCL. `PAGEDSERVE_TP_ALL_REDUCE=nccl` turns this off.

Every rank sets up the buffer of the model's dtype at the same collective point
(`TensorParallel.use_one_shot_all_reduce`, before the weights load and any CUDA graph is
captured); tensors of another dtype keep NCCL, so no set-up ever happens mid-forward. The
one-shot kernel sums the ranks' buffers in rank order on every rank, so all ranks hold
identical results.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

MAX_BYTES = 4 * 2**20  # one-shot reads every peer's whole buffer: it wins only for small tensors


def enabled() -> bool:
    return os.environ.get("PAGEDSERVE_TP_ALL_REDUCE", "auto") != "nccl"


def available() -> bool:
    """This torch has the symmetric-memory one-shot all-reduce."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")


class SymmetricAllReduce:
    """A symmetric buffer of `dtype` on this rank's GPU; `__call__` sums `x` over the group.

    Making one is collective (the buffers' rendezvous): every rank makes it at the same point.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        size = MAX_BYTES // torch.empty(0, dtype=dtype).element_size()
        self.buffer: torch.Tensor | None = symm_mem.empty(size, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        # newer kernels copy the input into this rank's buffer themselves: one launch less
        self.copies_in_kernel = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")

    def fits(self, x: torch.Tensor) -> bool:
        """`x` can go through the buffer: its dtype, 4-byte multiples and, so that the kernel
        can read it where it lies, 16-byte aligned like the buffer."""
        nbytes = x.numel() * x.element_size()
        return (self.buffer is not None and x.dtype == self.buffer.dtype and x.is_cuda
                and x.is_contiguous() and nbytes <= MAX_BYTES and nbytes % 4 == 0
                and x.data_ptr() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in a new tensor (`x` is left as it was)."""
        flat = x.view(-1)
        slot = self.buffer[: flat.numel()]
        out = torch.empty_like(flat)
        if self.copies_in_kernel:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(slot, flat, "sum", self.group_name,
                                                            out)
        else:
            slot.copy_(flat)
            torch.ops.symm_mem.one_shot_all_reduce_out(slot, "sum", self.group_name, out)
        return out.view_as(x)

    def release(self) -> None:
        """Drop the buffer (before the process group is destroyed)."""
        self.buffer = None
