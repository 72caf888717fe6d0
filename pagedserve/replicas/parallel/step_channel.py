"""Per-step control of a tensor-parallel group: rank 0 broadcasts, the other ranks follow.

Rank 0 runs the scheduler and builds the step's flat input tensor (see `step_inputs.upload`);
the other ranks need exactly that tensor. Each step costs two broadcasts inside the group: a
fixed-size header (what to do, the layout of the inputs) and the flat inputs themselves, plus
one broadcast of the sampled token ids after sampling (a later decode may read them on the
device). No Ray call and no host round trip per rank per step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pagedserve.replicas.engine.step_inputs import DeviceInputs, FlatLayout, HostInputs
from pagedserve.replicas.parallel.layers import TensorParallel

_STEP, _STOP = 1, 2
_NUM_ARRAYS = 9  # the arrays of FlatLayout.lengths
# kind, num_seqs, num_decodes, max_query_len, graph size (0: eager), table rows, table width,
# then the nine lengths
_HEADER_LEN = 7 + _NUM_ARRAYS


class StepBroadcaster:
    """Rank 0's end: publish each step's inputs, then its sampled ids; `stop` ends the followers."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp

    def publish(self, host: HostInputs, inputs: DeviceInputs, graph_size: int | None) -> None:
        layout = inputs.layout
        values = [_STEP, host.num_seqs, host.num_decodes, host.max_query_len, graph_size or 0,
                  *layout.table_shape, *layout.lengths]
        self._send_header(values)
        dist.broadcast(inputs.flat, src=0)

    def share_tokens(self, tokens: torch.Tensor) -> None:
        dist.broadcast(tokens.contiguous(), src=0)

    def stop(self) -> None:
        self._send_header([_STOP] + [0] * (_HEADER_LEN - 1))

    def _send_header(self, values: list[int]) -> None:
        # A fresh tensor each step: with NCCL the previous copy may still be in flight.
        header = torch.from_numpy(np.array(values, np.int64))
        if self.tp.device.type == "cuda":
            header = header.pin_memory().to(self.tp.device, non_blocking=True)
        dist.broadcast(header, src=0)


class FollowedStep:
    """One step as a follower rank receives it."""

    def __init__(self, inputs: DeviceInputs, num_seqs: int, graph_size: int | None) -> None:
        self.inputs, self.num_seqs, self.graph_size = inputs, num_seqs, graph_size


class StepReceiver:
    """A rank > 0's end: wait for the next step's inputs (None when rank 0 said stop)."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp

    def receive(self) -> FollowedStep | None:
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.tp.device)
        dist.broadcast(header, src=0)
        values = header.tolist()
        if values[0] == _STOP:
            return None
        _, num_seqs, num_decodes, max_query_len, graph_size, rows, width = values[:7]
        layout = FlatLayout(values[7:], (rows, width))
        flat = torch.empty(sum(layout.lengths), dtype=torch.int64, device=self.tp.device)
        dist.broadcast(flat, src=0)
        inputs = layout.views(flat, num_decodes, max_query_len)
        return FollowedStep(inputs, num_seqs, graph_size or None)

    def receive_tokens(self, count: int) -> torch.Tensor:
        tokens = torch.empty(count, dtype=torch.int64, device=self.tp.device)
        dist.broadcast(tokens, src=0)
        return tokens
