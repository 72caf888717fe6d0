"""CUDA graphs of the decode forward pass, one per batch size of a ladder.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
the CPU, not the GPU, sets the pace. A graph replays them all with one launch. Each graph reads
fixed input buffers, so a step copies its inputs in and pads its batch up to the next captured
size with rows that store nothing (slot -1) and attend to nothing (context 0).
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


class DecodeGraphs:
    """Captured decode forwards for every ladder size, sharing one memory pool."""

    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.sizes = batch_size_ladder(max_batch)
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
        return self.sizes[-1]

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds `num_seqs` rows, or None (run eagerly)."""
        return next((b for b in self.sizes if b >= num_seqs), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, so smaller graphs reuse the pool's memory."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside the graph: kernels compiled, handles made
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def release(self) -> None:
        """Free every graph. Must come before the tensor-parallel group is destroyed: NCCL
        cannot tear down a communicator that captured graphs still use (it hangs)."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
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
