"""CUDA graphs of the decode forward pass, one per batch size of a ladder.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
the CPU, not the GPU, sets the pace. A graph replays them all with one launch. Each graph reads
fixed input buffers, so a step copies its inputs in and pads its batch up to the next captured
size with rows that store nothing (slot -1) and attend to nothing (context 0).

Capturing the whole ladder takes about a second (35 sizes up to 256), so a new replica captures
only the smallest sizes and the largest before it is ready (`capture_early`): every decode
batch then has a graph, a mid-sized one padded up to the largest, whose padding rows cost
little (decode GEMMs read the same weights whatever their rows; padding rows attend to
nothing). The rest of the ladder is captured later, one size at a time, while the engine has
nothing to run (`capture_next`).
"""

from __future__ import annotations

import logging

import torch

from pagedserve.replicas.engine.step_inputs import DeviceInputs
from pagedserve.replicas.models.layers import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_batch` (and `max_batch` itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += range(16, max_batch, 8)
    return sorted({*sizes, max_batch})


EARLY_MAX = 8


def early_sizes(ladder: list[int]) -> list[int]:
    """The sizes captured before ready: the small ones (a lone stream, a few) and the largest,
    which holds every batch until the sizes between are captured."""
    return sorted({*(b for b in ladder if b <= EARLY_MAX), ladder[-1]})


class DecodeGraphs:
    """Captured decode forwards for the sizes of a ladder, sharing one memory pool."""

    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.ladder = batch_size_ladder(max_batch)
        self.sizes: list[int] = []  # captured so far, ascending
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        device = kv_cache.device
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        """The ladder's largest size (captured first: every capture includes it)."""
        return self.ladder[-1]

    @property
    def pending(self) -> list[int]:
        """Ladder sizes not captured yet."""
        return [b for b in self.ladder if b not in self.graphs]

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds `num_seqs` rows, or None (run eagerly)."""
        return next((b for b in self.sizes if b >= num_seqs), None)

    def capture(self) -> None:
        """Capture every size of the ladder."""
        self._capture(self.pending)

    def capture_early(self) -> None:
        """Capture what a new replica needs before it is ready (`early_sizes`)."""
        self._capture(early_sizes(self.ladder))

    def capture_next(self) -> bool:
        """Capture the largest pending size; True if more are pending after it. Call only with
        no step in flight (a capture synchronizes the device)."""
        pending = self.pending
        if pending:
            self._capture(pending[-1:])
        return len(pending) > 1

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        """Capture `sizes`, largest first, so smaller graphs reuse the pool's memory."""
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        self._clear_inputs()
        for size in sorted(sizes, reverse=True):
            self._forward(size)  # warm-up outside the graph: kernels compiled, handles made
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.sizes = sorted(self.graphs)
        logger.info("captured decode CUDA graphs for batch sizes %s (%d pending)",
                    sorted(sizes), len(self.pending))

    def _clear_inputs(self) -> None:
        """Rows that store nothing and attend to nothing. The warm-up forward before a capture
        runs for real: after serving, the buffers still hold the last replay's slots, and a
        deferred capture would write its rows' keys and values into those sequences' blocks
        (blocks that the prefix cache may hand to a later request)."""
        self.ids.zero_()
        self.positions.zero_()
        self.slots.fill_(-1)
        self.context_lens.zero_()
        self.block_tables.zero_()

    def release(self) -> None:
        """Free every graph. Must come before the tensor-parallel group is destroyed: NCCL
        cannot tear down a communicator that captured graphs still use (it hangs)."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.sizes = []
        torch.cuda.synchronize()

    def run(self, inputs: DeviceInputs, size: int) -> torch.Tensor:
        """Replay the graph of `size` rows on `inputs` (already padded to `size`)."""
        table = inputs.block_tables
        self.ids[:size].copy_(inputs.ids)
        self.positions[:size].copy_(inputs.positions)
        self.slots[:size].copy_(inputs.slots)
        self.context_lens[:size].copy_(inputs.context_lens)  # int64 -> int32 in the copy
        self.block_tables[:size, : table.shape[1]].copy_(table)
        self.graphs[size].replay()
        return self.outputs[size]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            num_decodes=size,
        )
        return self.model(self.ids[:size], self.positions[:size], meta, self.kv_cache)
