"""Runs the model for one scheduled step: builds flat inputs, owns the KV cache, samples."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pagedserve.config import EngineConfig
from pagedserve.kernels.triton_checks import supports_attention
from pagedserve.replicas.engine import prompt_logprobs, step_inputs
from pagedserve.replicas.engine.cuda_graphs import DecodeGraphs
from pagedserve.replicas.engine.kv_sizing import profile_peak_bytes
from pagedserve.replicas.engine.sampler import PendingSample, Sampler, SampleResult, plain_greedy
from pagedserve.replicas.engine.scheduler import SchedulerOutput
from pagedserve.replicas.engine.startup_phases import PhaseTimer
from pagedserve.replicas.models.loader import load_model
from pagedserve.replicas.models.spec import ModelSpec
from pagedserve.replicas.parallel.layers import TensorParallel
from pagedserve.replicas.parallel.step_channel import StepBroadcaster, StepReceiver

logger = logging.getLogger(__name__)

_MAX_GRAPH_BATCH = 512


def _attention_is_capturable(k_cache: torch.Tensor) -> bool:
    """The Triton kernels never sync with the host; the torch references do."""
    if os.environ.get("PAGEDSERVE_ATTENTION", "").lower() == "torch":
        return False
    return supports_attention(k_cache)

_GRAPH_RESERVE = 512 * 2**20  # graph pool, cuBLAS workspaces and allocator slack


class ModelRunner:
    """Owns the model weights and the KV cache of one device and executes scheduled steps.

    `execute_async` launches a step and returns before its sampled ids reach the host, so the
    engine can schedule the next step meanwhile; that step's decode inputs may then name tokens
    still on the device (placeholders), which are filled in from the previous step's ids there.

    Under tensor parallelism (`tp`) every rank has one, holding its shard of the weights and
    its KV heads. Rank 0's is driven by the engine and broadcasts each step's inputs and sampled
    ids; the others run `follow()`, which computes the same steps until rank 0 stops them.
    Every rank builds its runner the same way, so start-up collectives (profiling, graph
    capture) line up.
    """

    def __init__(self, config: EngineConfig, spec: ModelSpec, model_dir: str | Path,
                 device: torch.device, dtype: torch.dtype, eos_token_ids: list[int],
                 progress: bool = True, tp: TensorParallel | None = None,
                 tensors=None, model=None, defer_graphs: bool = False) -> None:
        """`tensors`: the checkpoint's tensors from elsewhere than `model_dir`; `model`: the
        model already built and loaded on `device` (a standby engine's); `defer_graphs`:
        capture only the decode graphs a new replica needs before ready, the rest later
        (`capture_next_graph`; one rank only: under tensor parallelism every rank would have
        to capture together)."""
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype
        self.block_size = config.block_size
        self.tp = tp
        self.num_kv_heads = spec.num_kv_heads // (tp.size if tp is not None else 1)  # this rank's
        self.timer = PhaseTimer(torch.cuda.synchronize if device.type == "cuda" else None)
        if tp is not None:
            tp.use_one_shot_all_reduce(dtype)
        with self.timer.phase("weights"):
            self.model = model if model is not None else load_model(
                spec, model_dir, dtype, device, progress, tp, tensors)
        with self.timer.phase("kv_cache"):
            self.num_blocks = self._num_kv_blocks()
            # [layers, K/V, blocks, block_size, kv_heads, head_dim]: one allocation per replica
            self.kv_cache = torch.zeros(
                spec.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                spec.head_dim, dtype=dtype, device=device,
            )
        self.sampler = Sampler(eos_token_ids)
        with self.timer.phase("cuda_graphs"):
            self.graphs = self._capture_graphs(defer_graphs and tp is None)
        # the step pipes: a collective, at the same point on every rank
        self.broadcaster = StepBroadcaster(tp) if tp is not None and tp.rank == 0 else None
        self.receiver = StepReceiver(tp) if tp is not None and tp.rank > 0 else None
        self._prompt_chunk = prompt_logprobs.rows_per_chunk(config.max_num_seqs)
        self._prev_tokens: torch.Tensor | None = None  # last step's sampled ids, on the device
        self._prev_rows: dict[int, int] = {}  # seq_id -> row of that tensor

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> SampleResult:
        """Compute every scheduled chunk and sample a token for each sequence that reached its end."""
        pending = self.execute_async(batch)
        return pending.result() if pending is not None else SampleResult([], [])

    @torch.inference_mode()
    def execute_async(self, batch: SchedulerOutput) -> PendingSample | None:
        """Launch the step; the returned handle's `result()` waits for the sampled ids (and
        the prompt logprobs the step computes). None when the step yields neither."""
        graph_size = self._graph_size(batch)
        scores = prompt_logprobs.plan(batch)
        host = step_inputs.prepare(batch, self.block_size, self._prev_rows, pad_to=graph_size,
                                   prompt_rows=prompt_logprobs.hidden_rows(scores))
        inputs = step_inputs.upload(host, self.device)
        sampled = [s.seq for s in batch.scheduled if s.samples]
        # under tensor parallelism every rank then works out the ids itself (`greedy_ids`)
        greedy = self.tp is not None and plain_greedy(sampled)
        if self.broadcaster is not None:
            self.broadcaster.publish(host, inputs, graph_size, greedy)
        hidden = self._forward(inputs, graph_size)
        prompt = (prompt_logprobs.score(self.model, hidden, inputs.prompt_rows, scores,
                                        self._prompt_chunk) if scores else None)
        hidden = step_inputs.sampling_rows(hidden, inputs, host.num_seqs, graph_size)
        if hidden is None:
            pending = PendingSample(None, None, []) if prompt is not None else None
        else:
            pending = self._sample(hidden, sampled, greedy)
        if pending is not None:
            pending.prompt = prompt
        return pending

    def _sample(self, hidden: torch.Tensor, sampled: list, greedy: bool) -> PendingSample:
        if greedy:
            pending = PendingSample(self.model.greedy_ids(hidden), None, sampled)
        else:
            pending = self.sampler.sample_async(self.model.compute_logits(hidden), sampled)
            if self.broadcaster is not None:
                self.broadcaster.share_tokens(pending.tokens)
        self._prev_tokens = pending.tokens
        self._prev_rows = {seq.seq_id: row for row, seq in enumerate(sampled)}
        return pending

    @torch.inference_mode()
    def follow(self) -> None:
        """A rank > 0's loop: compute every step rank 0 publishes, until it says stop."""
        receiver = self.receiver
        try:
            while (step := receiver.receive()) is not None:
                hidden = self._forward(step.inputs, step.graph_size)
                prompt_logprobs.follow(self.model, hidden, step.inputs.prompt_rows,
                                       self._prompt_chunk)
                hidden = step_inputs.sampling_rows(hidden, step.inputs, step.num_seqs,
                                                   step.graph_size)
                if hidden is None:
                    continue
                if step.greedy:  # the same ids as rank 0's, which a later decode may read
                    self._prev_tokens = self.model.greedy_ids(hidden)
                    continue
                self.model.compute_logits(hidden)  # rank 0 samples from the gathered logits
                if step.ids_follow:
                    self._prev_tokens = receiver.receive_tokens(hidden.shape[0])
        finally:
            receiver.close()

    def stop_followers(self) -> None:
        """Rank 0: end the other ranks' `follow` loops."""
        if self.broadcaster is not None:
            self.broadcaster.stop()
            self.broadcaster = None

    def capture_next_graph(self) -> bool:
        """Capture one deferred decode graph; True while more are pending. Call only with no
        step in flight."""
        if self.graphs is None or not self.graphs.pending:
            return False
        return self.graphs.capture_next()

    def release_graphs(self) -> None:
        """Free the decode CUDA graphs (before leaving a tensor-parallel group); runs eagerly after."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def _forward(self, inputs: step_inputs.DeviceInputs, graph_size: int | None) -> torch.Tensor:
        """The step's final hidden states, a row per input token (and per graph padding row)."""
        if len(inputs.fill_rows):  # decode inputs sampled by the step still in flight
            inputs.ids.index_copy_(0, inputs.fill_rows,
                                   self._prev_tokens.index_select(0, inputs.fill_from))
        if graph_size is not None:
            return self.graphs.run(inputs, graph_size)
        return self.model(inputs.ids, inputs.positions, inputs.meta, self.kv_cache)

    def kv_cache_bytes_per_block(self) -> int:
        spec = self.spec
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * spec.num_layers * self.block_size * self.num_kv_heads * spec.head_dim * elem

    @property
    def max_blocks_per_seq(self) -> int:
        longest = min(self.spec.max_position_embeddings, self.num_blocks * self.block_size)
        if self.config.max_model_len is not None:
            longest = min(longest, self.config.max_model_len)
        return -(-longest // self.block_size)

    def _graph_size(self, batch: SchedulerOutput) -> int | None:
        num_seqs = len(batch.scheduled)
        if self.graphs is None or batch.num_decodes != num_seqs:
            return None  # eager: no graphs, or a step with prefill chunks
        return self.graphs.padded_size(num_seqs)

    def _capture_graphs(self, early_only: bool) -> DecodeGraphs | None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        if not _attention_is_capturable(self.kv_cache[0, 0]):
            logger.info("decode CUDA graphs off: the attention kernels here sync with the host")
            return None
        max_batch = min(self.config.max_num_seqs, _MAX_GRAPH_BATCH)
        graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, self.max_blocks_per_seq)
        try:
            graphs.capture_early() if early_only else graphs.capture()
        except RuntimeError as err:  # e.g. an attention implementation that syncs with the host
            logger.warning("decode CUDA graphs unavailable, running eagerly: %s", err)
            torch.cuda.synchronize()
            return None
        return graphs

    def _num_kv_blocks(self) -> int:
        blocks = self._local_kv_blocks()
        # Every rank's cache must hold the same blocks: the scheduler on rank 0 plans for all.
        return blocks if self.tp is None else self.tp.min_int(blocks)

    def _local_kv_blocks(self) -> int:
        if self.config.num_kvcache_blocks is not None:
            return self.config.num_kvcache_blocks
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        blocks = int(budget // self.kv_cache_bytes_per_block())
        if blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache on {self.device} (budget {budget / 2**30:.2f} GiB); "
                "raise gpu_memory_utilization / cpu_kv_cache_gib or use a smaller model"
            )
        return blocks

    def _cuda_kv_budget(self) -> float:
        """Memory left under `gpu_memory_utilization` after the largest step's peak.

        A forward of `max_num_batched_tokens` tokens (plus sampling of `max_num_seqs` rows) runs
        first; its peak of allocated memory, the weights included, and whatever else holds device
        memory (the CUDA context, other processes) are subtracted from the allowed total.
        """
        peak = profile_peak_bytes(self)
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - others - peak - _GRAPH_RESERVE
        logger.info("KV budget %.2f GiB (peak %.2f GiB, other %.2f GiB, total %.2f GiB)",
                    budget / 2**30, peak / 2**30, others / 2**30, total / 2**30)
        return budget

