"""The engine loop of one replica: add requests, `step = schedule -> run -> postprocess`, abort."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.config import EngineConfig, resolve_device, resolve_dtype
from pagedserve.kernels.triton_cache import use_node_cache
from pagedserve.outputs import RequestOutput
from pagedserve.replicas.engine.block_manager import BlockManager
from pagedserve.replicas.engine.engine_stats import EngineStats
from pagedserve.replicas.engine.model_runner import ModelRunner
from pagedserve.replicas.engine.request import Request
from pagedserve.replicas.engine.sampler import PendingSample, SampleResult
from pagedserve.replicas.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.replicas.engine.sequence import PLACEHOLDER
from pagedserve.replicas.engine.warmup import warm_up
from pagedserve.replicas.models.model_files import ModelFiles, load_model_files
from pagedserve.replicas.parallel.group import leave_group
from pagedserve.replicas.parallel.layers import check_tensor_parallel
from pagedserve.replicas.parallel.ranks import join_as_rank0
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

@dataclass
class _InFlight:
    """A launched batch whose sampled tokens have not been applied yet."""

    batch: SchedulerOutput
    pending: PendingSample | None
    sample_indices: list[int]  # where each sampled token goes in its sequence's token_ids
    needs_sync: bool  # a sequence samples from its history (penalties) or shares a prompt (n > 1)


def _needs_history(seq) -> bool:
    p = seq.params
    return (p.n > 1 or p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or seq.matcher is not None)  # a grammar's next mask needs the last token accepted


class LLMEngine:
    """Continuous-batching engine over a paged KV cache; runs on CPU or one GPU, without Ray.

    With `tensor_parallel_size` > 1 this engine is rank 0 of a tensor-parallel group: it
    schedules and samples, and every rank computes its shard of each step. The other ranks wait
    at `init_method` (started elsewhere, e.g. as Ray actors) or, without one, are started here
    as local processes. `shutdown()` stops them.
    """

    def __init__(self, config: EngineConfig, progress: bool = True,
                 init_method: str | None = None, tensors=None, model=None,
                 files: ModelFiles | None = None, defer_graphs: bool = False) -> None:
        """`tensors`: the checkpoint's `(name, tensor)` pairs when they come from elsewhere than
        the model directory's safetensors files (e.g. mapped from the node's weight store); `model`: the
        model already loaded on this engine's device (a standby engine's), used as it is;
        `files`: the model's config and tokenizer, read ahead (used only if it is
        `config.model`'s); `defer_graphs`: a server's engine, ready sooner: the decode graphs
        that are not needed at once are captured later, by `idle_work`."""
        self.config = config
        self.num_steps, self.step_seconds = 0, 0.0  # for the step-time metrics
        started = time.perf_counter()
        use_node_cache()  # Triton kernels compiled on this node before are found, not rebuilt
        if files is None or files.model != config.model:
            files = load_model_files(config.model, progress=progress)
        self.model_dir, self.spec = files.model_dir, files.spec
        check_tensor_parallel(self.spec.num_heads, self.spec.num_kv_heads,
                              self.spec.intermediate_size, config.tensor_parallel_size)
        self.tokenizer, self.eos_token_ids = files.tokenizer, files.eos_token_ids
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        files_s = time.perf_counter() - started  # config, tokenizer (and a first GGUF convert)
        tp, self._local_ranks = None, None
        if config.tensor_parallel_size > 1:
            tp, self._local_ranks = join_as_rank0(config, self.device, init_method)
            self.device = tp.device
        try:
            self.runner = ModelRunner(config, self.spec, self.model_dir, self.device, self.dtype,
                                      self.eos_token_ids, progress, tp, tensors, model,
                                      defer_graphs)
        except BaseException:
            self._leave_group(tp)
            raise
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        self.max_model_len = self._max_model_len()
        self.requests: dict[str, Request] = {}
        self._grammars = None  # structured outputs: compiled on the first such request
        # Overlap host work with the device's: pays on a GPU, would only reorder work on a CPU.
        self.overlap_steps = self.device.type == "cuda"
        self._in_flight: _InFlight | None = None
        if self.device.type == "cuda":  # no kernel compiles once ready (see `warmup`)
            with self.runner.timer.phase("kernel_warmup"):
                warm_up(self)
        self.startup_phases = {"model_files": files_s, **self.runner.timer.phases}

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a prompt (text, or token ids) for generation; raises ValueError for bad input."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        _check_logit_bias(params, self.spec.vocab_size)
        matchers = self._matchers(params)  # ValueError if the grammar does not compile
        request = Request(request_id, text, token_ids, params, self.config.block_size,
                          self.tokenizer, self.max_model_len)
        for seq, matcher in zip(request.seqs, matchers, strict=False):
            seq.grammars, seq.matcher = self._grammars, matcher
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _matchers(self, params: SamplingParams) -> list:
        """One grammar matcher per completion of a structured request, else none."""
        if params.structured is None:
            return []
        if self._grammars is None:
            from pagedserve.replicas.engine.structured import Grammars

            self._grammars = Grammars(self.tokenizer, self.spec.vocab_size)
        return [self._grammars.matcher(params.structured) for _ in range(params.n)]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored.

        Returns the request's last delta (what was new since its previous output)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.abort()
        for seq in request.seqs:
            self.scheduler.finish(seq)
        return request.delta()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (if any); the engine cannot step afterwards."""
        runner = getattr(self, "runner", None)
        if runner is not None and runner.tp is not None:
            runner.stop_followers()
            runner.release_graphs()
            self._leave_group(runner.tp)
            runner.tp = None

    def _leave_group(self, tp) -> None:
        if tp is not None:
            leave_group(tp)
        if self._local_ranks is not None:
            self._local_ranks.stop()
            self._local_ranks = None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def idle_work(self) -> bool:
        """Do one piece of the start-up work deferred past ready (a decode graph to capture);
        True while more remains. Call only while no request is unfinished: a piece holds the
        engine for tens of milliseconds."""
        if self.requests:
            return True  # not now: later, when idle
        if self._in_flight is not None:  # a batch launched before its requests ended
            self._resolve({})
        return self.runner.capture_next_graph()

    def step(self, stream: bool | Callable[[str], bool] = True) -> list[RequestOutput]:
        """Run one batch; return a delta for every request that advanced.

        A request's output holds only what is new since its previous one (`Request.delta`):
        its first holds everything so far. With `stream=False` only finished requests' outputs
        are built, so each holds the whole result (the offline API needs no more), which saves
        building and detokenizing every running request every step; a callable decides per
        request id (a server builds them only for waiting consumers).

        On CUDA the step is pipelined: this call launches the next batch, then collects the
        previous one's tokens while the GPU works, so outputs lag the launch by one step.
        """
        started = time.perf_counter()
        try:
            return self._step(stream)
        finally:
            self.num_steps += 1
            self.step_seconds += time.perf_counter() - started

    def _step(self, stream: bool | Callable[[str], bool]) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        if self._in_flight is not None and self._in_flight.needs_sync:
            self._resolve(touched)  # the next batch needs those tokens on the host (penalties)
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.scheduled else None
        if self._in_flight is not None:
            self._resolve(touched)
        self._in_flight = launched
        if launched is not None and not self.overlap_steps:
            self._resolve(touched)
        return self._outputs(touched, stream)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.num_prefix_hits / max(1, bm.num_prefix_queries),
            num_preemptions=self.scheduler.num_preemptions,
            num_prefix_hit_tokens=bm.num_prefix_hits,
            num_prefix_queried_tokens=bm.num_prefix_queries,
            num_steps=self.num_steps,
            step_seconds=self.step_seconds,
        )

    def _launch(self, batch: SchedulerOutput) -> _InFlight:
        """Start the batch on the device and advance its sequences as if it had finished.

        Each sampled token is a placeholder in `token_ids` until `_resolve` puts it there, so
        the scheduler can plan the next step (lengths, blocks) before the token is known.
        """
        pending = self.runner.execute_async(batch)
        indices, needs_sync = [], False
        for item in batch.scheduled:
            seq = item.seq
            seq.advance(item.num_tokens)
            if item.samples:
                seq.token_ids.append(PLACEHOLDER)
                indices.append(len(seq.token_ids) - 1)
                needs_sync = needs_sync or _needs_history(seq)
        return _InFlight(batch, pending, indices, needs_sync)

    def _resolve(self, touched: dict[str, Request]) -> None:
        """Wait for the launched batch's tokens and apply them: stops, finishes, prefix blocks."""
        flight, self._in_flight = self._in_flight, None
        result = flight.pending.result() if flight.pending is not None else SampleResult([], [])
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(entries)  # before any delta of its request is built
        samples = iter(zip(result.token_ids, result.logprobs, flight.sample_indices, strict=True))
        for item in flight.batch.scheduled:
            seq = item.seq
            sample = next(samples) if item.samples else None
            if seq.is_finished:
                continue  # aborted, or ended by an earlier token while this batch ran
            if sample is not None:
                self._apply_sample(seq, *sample, touched)
                continue
            self.block_manager.register_computed_blocks(seq)
            if item.reaches_end:  # no output allowed (max_tokens=0): the prompt was all
                self._finish(seq, self.requests[seq.request_id].end_without_output(seq), touched)

    def _apply_sample(self, seq, token_id: int, logprobs: dict[int, float] | None, index: int,
                      touched: dict[str, Request]) -> None:
        """Put a sampled token in place of its placeholder (then its blocks can be hashed)."""
        request = self.requests[seq.request_id]
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id]
        reason = request.on_sampled(seq, index, token_id, self.eos_token_ids)
        self.block_manager.register_computed_blocks(seq)
        if reason is not None:
            self._finish(seq, reason, touched)
        touched[seq.request_id] = request

    def _finish(self, seq, reason: str, touched: dict[str, Request]) -> None:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        touched[seq.request_id] = self.requests[seq.request_id]

    def _outputs(self, touched: dict[str, Request], stream) -> list[RequestOutput]:
        outputs = []
        for request in touched.values():
            finished = request.finished
            wanted = stream(request.request_id) if callable(stream) else stream
            if wanted or finished:
                outputs.append(request.delta())
            if finished:
                del self.requests[request.request_id]
        return outputs

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple):
            text, token_ids = None, list(prompt)
            _check_token_ids(token_ids, self.spec.vocab_size)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty (it encodes to no tokens)")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; it must be shorter than max_model_len "
                f"({self.max_model_len}) to leave room for at least one generated token"
            )
        return text, token_ids

    def _max_model_len(self) -> int:
        limits = [self.spec.max_position_embeddings, self.runner.num_blocks * self.config.block_size]
        if self.spec.sliding_window is not None:
            limits.append(self.spec.sliding_window)
        length = min(limits)
        wanted = self.config.max_model_len
        if wanted is not None and wanted > length:
            raise ValueError(
                f"max_model_len={wanted} exceeds what this model and KV cache allow ({length}: "
                f"max_position_embeddings={self.spec.max_position_embeddings}, "
                f"KV cache holds {self.runner.num_blocks * self.config.block_size} tokens)"
            )
        return wanted or length


def _check_token_ids(token_ids: list, vocab_size: int) -> None:
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt token id {t!r} is not an integer in [0, {vocab_size})")


def _check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    outside = [t for t in params.logit_bias or {} if t >= vocab_size]
    if outside:
        raise ValueError(f"logit_bias token id {outside[0]} is outside the vocabulary "
                         f"(size {vocab_size})")
