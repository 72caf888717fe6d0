"""Per-step control of a tensor-parallel group: rank 0 broadcasts, the other ranks follow.

Rank 0 runs the scheduler and builds the step's flat input array (see `step_inputs.upload`);
the other ranks need exactly that array. Each step costs two host-side broadcasts inside the
group (gloo): a fixed-size header (what to do, the layout of the inputs) and the flat inputs.
On a GPU, where the engine launches a step before the previous one's sampled ids reach the
host, rank 0 also broadcasts those ids on the device (NCCL), since a later decode reads them
there. No Ray call and no round trip per rank per step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pagedserve.replicas.engine.step_inputs import DeviceInputs, FlatLayout, HostInputs
from pagedserve.replicas.parallel.layers import TensorParallel

_STEP, _STOP = 1, 2
_NUM_ARRAYS = 9  # the arrays of FlatLayout.lengths
# kind, num_seqs, num_decodes, max_query_len, graph size (0: eager), ids follow (0/1),
# table rows, table width, then the nine lengths
_HEADER_LEN = 8 + _NUM_ARRAYS


def shares_sampled_ids(tp: TensorParallel) -> bool:
    """Only a GPU engine overlaps steps, so only there can inputs name ids still on the device."""
    return tp.device.type == "cuda"


class StepBroadcaster:
    """Rank 0's end: publish each step's inputs, then its sampled ids; `stop` ends the followers."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp
        self.share_ids = shares_sampled_ids(tp)

    def publish(self, host: HostInputs, inputs: DeviceInputs, graph_size: int | None) -> None:
        layout = inputs.layout
        self._send_header([_STEP, host.num_seqs, host.num_decodes, host.max_query_len,
                           graph_size or 0, int(self.share_ids), *layout.table_shape,
                           *layout.lengths])
        dist.broadcast(inputs.host_flat, src=0, group=self.tp.control_group)

    def share_tokens(self, tokens: torch.Tensor) -> None:
        if self.share_ids:
            dist.broadcast(tokens.contiguous(), src=0)

    def stop(self) -> None:
        self._send_header([_STOP] + [0] * (_HEADER_LEN - 1))

    def _send_header(self, values: list[int]) -> None:
        header = torch.from_numpy(np.array(values, np.int64))
        dist.broadcast(header, src=0, group=self.tp.control_group)


class FollowedStep:
    """One step as a follower rank receives it."""

    def __init__(self, inputs: DeviceInputs, num_seqs: int, graph_size: int | None,
                 ids_follow: bool) -> None:
        self.inputs, self.num_seqs, self.graph_size = inputs, num_seqs, graph_size
        self.ids_follow = ids_follow


class StepReceiver:
    """A rank > 0's end: wait for the next step's inputs (None when rank 0 said stop)."""

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp

    def receive(self) -> FollowedStep | None:
        header = torch.empty(_HEADER_LEN, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.tp.control_group)
        values = header.tolist()
        if values[0] == _STOP:
            return None
        _, num_seqs, num_decodes, max_query_len, graph_size, ids_follow, rows, width = values[:8]
        layout = FlatLayout(values[8:], (rows, width))
        host_flat = torch.empty(sum(layout.lengths), dtype=torch.int64)
        dist.broadcast(host_flat, src=0, group=self.tp.control_group)
        inputs = layout.views(host_flat, num_decodes, max_query_len, self.tp.device)
        return FollowedStep(inputs, num_seqs, graph_size or None, bool(ids_follow))

    def receive_tokens(self, count: int) -> torch.Tensor:
        tokens = torch.empty(count, dtype=torch.int64, device=self.tp.device)
        dist.broadcast(tokens, src=0)
        return tokens
