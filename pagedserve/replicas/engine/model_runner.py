"""Runs the model for one scheduled step: builds flat inputs, owns the KV cache, samples."""

from __future__ import annotations

from pathlib import Path

import torch

from pagedserve.config import EngineConfig
from pagedserve.replicas.engine.sampler import Sampler, SampleResult
from pagedserve.replicas.engine.scheduler import SchedulerOutput
from pagedserve.replicas.models.layers import AttentionMetadata
from pagedserve.replicas.models.loader import load_model
from pagedserve.replicas.models.spec import ModelSpec


class ModelRunner:
    """Owns the model weights and the KV cache of one device and executes scheduled steps."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, model_dir: str | Path,
                 device: torch.device, dtype: torch.dtype, eos_token_ids: list[int],
                 progress: bool = True) -> None:
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype
        self.block_size = config.block_size
        self.model = load_model(spec, model_dir, dtype, device, progress)
        self.num_blocks = self._num_kv_blocks()
        # [layers, K/V, blocks, block_size, kv_heads, head_dim]: one allocation for the replica
        self.kv_cache = torch.zeros(
            spec.num_layers, 2, self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim,
            dtype=dtype, device=device,
        )
        self.sampler = Sampler(eos_token_ids)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> SampleResult:
        """Compute every scheduled chunk and sample a token for each sequence that reached its end."""
        input_ids, positions, meta, sample_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv_cache)
        sampled = [s.seq for s in batch.scheduled if s.samples]
        if not sampled:
            return SampleResult([], [])
        logits = self.model.compute_logits(hidden[sample_rows])
        return self.sampler(logits, sampled)

    def kv_cache_bytes_per_block(self) -> int:
        spec = self.spec
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kvcache_blocks is not None:
            return self.config.num_kvcache_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used - _activation_reserve(self)
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        blocks = int(budget // self.kv_cache_bytes_per_block())
        if blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache on {self.device} (budget {budget / 2**30:.2f} GiB); "
                "raise gpu_memory_utilization / cpu_kv_cache_gib or use a smaller model"
            )
        return blocks

    def _prepare(self, batch: SchedulerOutput):
        bs = self.block_size
        ids, pos, slots, starts, ctx, tables, sample_rows = [], [], [], [0], [], [], []
        for item in batch.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            starts.append(starts[-1] + item.num_tokens)
            ctx.append(end)
            tables.append(table)
            if item.samples:
                sample_rows.append(starts[-1] - 1)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.long),
            block_tables=self._tensor(_pad(tables), torch.int32),
            context_lens=self._tensor(ctx, torch.int32),
            query_start_loc=self._tensor(starts, torch.int32),
            num_decodes=batch.num_decodes,
        )
        return self._tensor(ids, torch.long), self._tensor(pos, torch.long), meta, sample_rows

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)


def _pad(tables: list[list[int]]) -> list[list[int]]:
    width = max(len(t) for t in tables)
    return [t + [0] * (width - len(t)) for t in tables]


def _activation_reserve(runner: ModelRunner) -> int:
    """Bytes kept free for activations and logits of the largest step."""
    spec, tokens = runner.spec, runner.config.max_num_batched_tokens
    per_token = 4 * (spec.hidden_size * 4 + spec.intermediate_size * 2) + 4 * spec.vocab_size
    return tokens * per_token + 512 * 2**20
