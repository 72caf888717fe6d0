"""Flat model inputs of one step, built on the host with numpy and sent in one copy."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.replicas.engine.scheduler import SchedulerOutput
from pagedserve.replicas.engine.sequence import PLACEHOLDER, Sequence
from pagedserve.replicas.models.layers import AttentionMetadata


@dataclass
class HostInputs:
    """One step's inputs as host arrays; rows past `num_seqs` (if any) are padding."""

    ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64, -1 = do not store (padding)
    context_lens: np.ndarray  # [B] int64, 0 for padding rows
    query_start_loc: np.ndarray  # [B + 1] int64
    block_tables: np.ndarray  # [B, W] int64
    sample_rows: np.ndarray  # [S] rows whose hidden state gives a next token
    fill_rows: np.ndarray  # [P] rows whose input id is the previous step's sampled token ...
    fill_from: np.ndarray  # [P] ... at this row of that step's sampled ids
    num_seqs: int
    num_decodes: int
    max_query_len: int
    # [R] rows whose logits score prompt tokens (prompt_logprobs; see prompt_logprobs.py)
    prompt_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class DeviceInputs:
    """The same arrays on the device, as int64 views of one transfer."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    block_tables: torch.Tensor
    sample_rows: torch.Tensor
    fill_rows: torch.Tensor
    fill_from: torch.Tensor
    prompt_rows: torch.Tensor
    num_decodes: int
    max_query_len: int
    flat: torch.Tensor | None = None  # the one tensor all of the above are views of ...
    layout: FlatLayout | None = None  # ... and how they are cut from it
    host_flat: torch.Tensor | None = None  # that tensor's host copy (tensor parallelism sends it)

    @functools.cached_property
    def meta(self) -> AttentionMetadata:
        """Attention metadata with int32 index tensors (built only by eager steps: a graph
        replay copies the int64 views into its own int32 buffers, casting on the way)."""
        return AttentionMetadata(
            slot_mapping=self.slots,
            block_tables=self.block_tables.to(torch.int32),
            context_lens=self.context_lens.to(torch.int32),
            query_start_loc=self.query_start_loc.to(torch.int32),
            num_decodes=self.num_decodes,
            max_query_len=self.max_query_len,
        )


def sampling_rows(hidden: torch.Tensor, inputs: DeviceInputs, num_seqs: int,
                  graph_size: int | None) -> torch.Tensor | None:
    """The hidden states whose logits give next tokens (None if no sequence samples)."""
    num_sampled = len(inputs.sample_rows)
    if not num_sampled:
        return None
    if num_sampled == num_seqs and graph_size is not None:
        return hidden[:num_seqs]  # a decode graph's rows, padding cut off
    return hidden[inputs.sample_rows]


def prepare(batch: SchedulerOutput, block_size: int, prev_rows: dict[int, int],
            pad_to: int | None = None, prompt_rows: np.ndarray | None = None) -> HostInputs:
    """Flatten `batch`; a decode batch may be padded to `pad_to` rows of no-op sequences.
    `prompt_rows`: the rows whose logits score prompt tokens (`prompt_logprobs.hidden_rows`)."""
    ids, pos, slots, ctx, starts, sample_rows, fill_rows, fill_from = [], [], [], [], [0], [], [], []
    for item in batch.scheduled:
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_tokens
        table = seq.block_table
        if item.num_tokens == 1:
            ids.append(seq.token_ids[start])
            pos.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(start, end))
        if ids[-1] == PLACEHOLDER:  # only a sequence's last token can still be in flight
            fill_rows.append(len(ids) - 1)
            fill_from.append(prev_rows[seq.seq_id])
            ids[-1] = 0
        starts.append(len(ids))
        ctx.append(end)
        if item.samples:
            sample_rows.append(len(ids) - 1)
    num_seqs = len(ctx)
    pad = (pad_to or num_seqs) - num_seqs
    if pad:  # padded rows store nothing (slot -1) and attend to nothing (context 0)
        ids += [0] * pad
        pos += [0] * pad
        slots += [-1] * pad
        ctx += [0] * pad
        starts += range(starts[-1] + 1, starts[-1] + 1 + pad)
    return HostInputs(
        np.array(ids, np.int64), np.array(pos, np.int64), np.array(slots, np.int64),
        np.array(ctx, np.int64), np.array(starts, np.int64),
        _block_tables([item.seq for item in batch.scheduled], num_seqs + pad),
        np.array(sample_rows, np.int64), np.array(fill_rows, np.int64),
        np.array(fill_from, np.int64), num_seqs, batch.num_decodes + pad,
        max(b - a for a, b in zip(starts, starts[1:], strict=False)),
        np.zeros(0, np.int64) if prompt_rows is None else prompt_rows,
    )


def _block_tables(seqs: list[Sequence], rows: int) -> np.ndarray:
    arrays = [_table_array(seq) for seq in seqs]
    width = max(len(a) for a in arrays)
    out = np.zeros((rows, width), np.int64)
    for row, array in enumerate(arrays):
        out[row, : len(array)] = array
    return out


def _table_array(seq: Sequence) -> np.ndarray:
    """`seq.block_table` as an array, converted again only when the table changed.

    Tables only grow by appending, and are replaced by a new list when freed, so the list's
    identity and length tell whether the cached array is current.
    """
    cached = seq.block_table_array
    table = seq.block_table
    if cached is None or cached[0] is not table or len(cached[1]) != len(table):
        cached = (table, np.array(table, np.int64))
        seq.block_table_array = cached
    return cached[1]


def upload(host: HostInputs, device: torch.device) -> DeviceInputs:
    """One host-to-device copy of every array, then views into it."""
    parts = [host.ids, host.positions, host.slots, host.context_lens, host.query_start_loc,
             host.block_tables.reshape(-1), host.sample_rows, host.fill_rows, host.fill_from,
             host.prompt_rows]
    layout = FlatLayout([len(p) for p in parts], host.block_tables.shape)
    return layout.views(torch.from_numpy(np.concatenate(parts)), host.num_decodes,
                        host.max_query_len, device)


@dataclass
class FlatLayout:
    """How `upload` packs a step's arrays into one int64 tensor (tensor-parallel ranks get the
    same tensor and unpack it with the same layout)."""

    lengths: list[int]  # of ids, positions, slots, context_lens, query_start_loc, the flat
    # block tables, sample_rows, fill_rows, fill_from, prompt_rows
    table_shape: tuple[int, int]

    def views(self, host_flat: torch.Tensor, num_decodes: int, max_query_len: int,
              device: torch.device) -> DeviceInputs:
        """Copy `host_flat` to `device` (one transfer) and cut the step's arrays from it."""
        flat = host_flat
        if device.type != "cpu":
            flat = host_flat.pin_memory().to(device, non_blocking=True)
        views = list(flat.split(self.lengths))
        views[5] = views[5].view(self.table_shape)
        return DeviceInputs(*views, num_decodes=num_decodes, max_query_len=max_query_len,
                            flat=flat, layout=self, host_flat=host_flat)
