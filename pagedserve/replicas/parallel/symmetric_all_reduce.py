"""All-reduce of small GPU tensors through symmetric memory (one-shot), NCCL for the rest.

A decode step runs two all-reduces per layer of at most a few MB each ([batch, hidden]), where
NCCL's latency dominates: on two H200s one took 17.5 us at batch 1 and 35.5 us at batch 256
inside a CUDA graph, against 7.5 and 20.5 us for torch's symmetric-memory one-shot kernel, in
which each GPU reads its peers' buffers over NVLink and sums them (`benchmarks/tp_overheads.py`).
Where the sum feeds a residual add and RMSNorm (every row-parallel output does), `add_norm` does
all three in one kernel of ours (`all_reduce_norm`), which pushes its rows into the peers'
symmetric inboxes. Prefill chunks larger than `MAX_BYTES` keep NCCL.
`PAGEDSERVE_TP_ALL_REDUCE=unfused` keeps the norm apart, `=nccl` turns all of this off.

torch keys each rendezvous by a per-process count (`rendezvous_calls`), so a group whose ranks'
processes made different numbers of them (a rank 0 that served an earlier group) keeps NCCL.

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

from pagedserve.kernels import all_reduce_norm

MAX_BYTES = 4 * 2**20  # one-shot reads every peer's whole buffer: it wins only for small tensors


def enabled() -> bool:
    return os.environ.get("PAGEDSERVE_TP_ALL_REDUCE", "auto") != "nccl"


def fused_enabled() -> bool:
    """The all-reduce may be fused with the residual add and RMSNorm after it (`=unfused`: not)."""
    return os.environ.get("PAGEDSERVE_TP_ALL_REDUCE", "auto") == "auto"


def available() -> bool:
    """This torch has the symmetric-memory one-shot all-reduce."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")


_rendezvous_calls = 0  # in this process; torch numbers its rendezvous exchanges the same way


def rendezvous_calls() -> int:
    """Symmetric-memory rendezvous this process made so far.

    torch keys each rendezvous's exchange by a per-process sequence number, so ranks whose
    processes made different numbers of them (a new rank next to a rank 0 that served an
    earlier group) would wait forever for each other's keys.
    """
    return _rendezvous_calls


def _rendezvous(tensor: torch.Tensor, group_name: str):
    import torch.distributed._symmetric_memory as symm_mem

    global _rendezvous_calls
    _rendezvous_calls += 1
    return symm_mem.rendezvous(tensor, group_name)


class SymmetricAllReduce:
    """Symmetric buffers of `dtype` on this rank's GPU; `__call__` sums `x` over the group.

    Making one is collective (the buffers' rendezvous): every rank makes it at the same point.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        size = MAX_BYTES // torch.empty(0, dtype=dtype).element_size()
        self.buffer: torch.Tensor | None = symm_mem.empty(size, dtype=dtype, device=device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        _rendezvous(self.buffer, self.group_name)  # torch's one-shot kernel finds it by group
        # newer kernels copy the input into this rank's buffer themselves: one launch less
        self.copies_in_kernel = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        self.fuses_norm = fused_enabled() and all_reduce_norm.triton is not None
        self.inbox = None
        if self.fuses_norm:
            # the fused all-reduce + add + norm's inbox: marked empty on every rank before any
            # peer can write to it (the rendezvous is collective)
            self.inbox = symm_mem.empty(all_reduce_norm.inbox_elements(size, self.world),
                                        dtype=dtype, device=device)
            all_reduce_norm.fill_with_sentinel(self.inbox)
            torch.cuda.synchronize(device)
            self.inbox_ptrs = self._pointers(self.inbox, device)
            self.call_counts = all_reduce_norm.new_call_counts(device)

    def _pointers(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Every rank's address of its `tensor` (a collective rendezvous), on the device."""
        handle = _rendezvous(tensor, self.group_name)
        return torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)

    def fits(self, x: torch.Tensor) -> bool:
        """`x` can go through the buffer (its dtype; the kernel needs 4-byte multiples).

        Only what every rank's `x` shares may decide this (shape, dtype), never its address:
        ranks that chose differently would wait for each other in different collectives.
        """
        nbytes = x.numel() * x.element_size()
        return (self.buffer is not None and x.dtype == self.buffer.dtype and x.is_cuda
                and x.is_contiguous() and nbytes <= MAX_BYTES and nbytes % 4 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in a new tensor (`x` is left as it was)."""
        flat = x.view(-1)
        slot = self.buffer[: flat.numel()]
        out = torch.empty_like(flat)
        if self.copies_in_kernel and flat.data_ptr() % 16 == 0:  # aligned like the buffer
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(slot, flat, "sum", self.group_name,
                                                            out)
        else:
            slot.copy_(flat)
            torch.ops.symm_mem.one_shot_all_reduce_out(slot, "sum", self.group_name, out)
        return out.view_as(x)

    def fits_rows(self, x: torch.Tensor) -> bool:
        """`x` ([rows, hidden]) can go through `add_norm`."""
        return self.fuses_norm and x.dim() == 2 and self.fits(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_rms_norm(sum over ranks of x, residual, weight, eps)` in one kernel."""
        return all_reduce_norm.all_reduce_add_rms_norm(
            x, residual, weight, eps, self.inbox_ptrs, self.buffer.numel(), self.call_counts,
            self.rank, self.world)

    def release(self) -> None:
        """Drop the buffers (before the process group is destroyed)."""
        self.buffer = self.inbox = None
