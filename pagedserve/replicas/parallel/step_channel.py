"""Per-step control of a tensor-parallel group: rank 0 sends each step, the other ranks follow.

Rank 0 runs the scheduler and builds the step's flat input array (see `step_inputs.upload`);
the other ranks need exactly that array. The ranks of a group share one host (a replica's
placement group is STRICT_PACK; offline they are child processes), so each step travels
through one pipe per follower (`step_pipes`): a fixed-size header (what to do, the layout of
the inputs) and the flat inputs, in one write. The write returns once the bytes are in the
pipe, so rank 0 never waits for a follower to be ready; a follower sleeps in `read` until a
step arrives. On a GPU, where the engine launches a step before the previous one's sampled
ids reach the host, a later decode reads those ids on the device, so every rank needs them
there: when every sequence of the step is plainly greedy, each rank works them out itself
(`greedy_ids`, which exchanges one (value, id) pair a row instead of the logits); otherwise
rank 0 samples and broadcasts them (NCCL). No Ray call and no round trip per rank per step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pagedserve.replicas.engine.step_inputs import DeviceInputs, FlatLayout, HostInputs
from pagedserve.replicas.parallel import step_pipes
from pagedserve.replicas.parallel.layers import TensorParallel

_STEP, _STOP = 1, 2
_NUM_ARRAYS = 10  # the arrays of FlatLayout.lengths
# kind, num_seqs, num_decodes, max_query_len, graph size (0: eager), ids follow (0/1),
# greedy ids on every rank (0/1), table rows, table width, then the ten lengths
HEADER_LEN = 9 + _NUM_ARRAYS


def shares_sampled_ids(tp: TensorParallel) -> bool:
    """Only a GPU engine overlaps steps, so only there can inputs name ids still on the device."""
    return tp.device.type == "cuda"


class StepBroadcaster:
    """Rank 0's end: publish each step's inputs, then its sampled ids; `stop` ends the followers.

    Making one opens the pipes: a collective, matched by each follower making its
    `StepReceiver`.
    """

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp
        self.share_ids = shares_sampled_ids(tp)
        self.pipes = step_pipes.open_writers(tp.size)

    def publish(self, host: HostInputs, inputs: DeviceInputs, graph_size: int | None,
                greedy: bool = False) -> None:
        """Send a step; `greedy`: every rank works its ids out (`greedy_ids`), none are shared."""
        layout = inputs.layout
        header = [_STEP, host.num_seqs, host.num_decodes, host.max_query_len, graph_size or 0,
                  int(self.share_ids and not greedy), int(greedy), *layout.table_shape,
                  *layout.lengths]
        self.pipes.send(np.concatenate([np.array(header, np.int64), inputs.host_flat.numpy()]))

    def share_tokens(self, tokens: torch.Tensor) -> None:
        if self.share_ids:
            dist.broadcast(tokens.contiguous(), src=0)

    def stop(self) -> None:
        """Tell the followers to stop, then close the pipes (their `receive` returns None)."""
        try:
            self.pipes.send(np.array([_STOP] + [0] * (HEADER_LEN - 1), np.int64))
        finally:
            self.pipes.close()


class FollowedStep:
    """One step as a follower rank receives it."""

    def __init__(self, inputs: DeviceInputs, num_seqs: int, graph_size: int | None,
                 ids_follow: bool, greedy: bool) -> None:
        self.inputs, self.num_seqs, self.graph_size = inputs, num_seqs, graph_size
        self.ids_follow, self.greedy = ids_follow, greedy


class StepReceiver:
    """A rank > 0's end: wait for the next step's inputs (None when rank 0 said stop).

    Raises `step_pipes.PeerGone` if rank 0 went away without saying stop.
    """

    def __init__(self, tp: TensorParallel) -> None:
        self.tp = tp
        self.pipe = step_pipes.open_reader(tp.rank)

    def receive(self) -> FollowedStep | None:
        values = self.pipe.receive(HEADER_LEN).tolist()
        if values[0] == _STOP:
            self.pipe.close()
            return None
        _, num_seqs, num_decodes, max_query_len, graph_size, ids_follow, greedy, rows, width = (
            values[:9])
        layout = FlatLayout(values[9:], (rows, width))
        host_flat = torch.from_numpy(self.pipe.receive(sum(layout.lengths)))
        inputs = layout.views(host_flat, num_decodes, max_query_len, self.tp.device)
        return FollowedStep(inputs, num_seqs, graph_size or None, bool(ids_follow), bool(greedy))

    def receive_tokens(self, count: int) -> torch.Tensor:
        tokens = torch.empty(count, dtype=torch.int64, device=self.tp.device)
        dist.broadcast(tokens, src=0)
        return tokens

    def close(self) -> None:
        self.pipe.close()
