"""The engine loop of one replica: add requests, `step = schedule -> run -> postprocess`, abort."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedserve.config import EngineConfig
from pagedserve.outputs import RequestOutput
from pagedserve.replicas.engine.block_manager import BlockManager
from pagedserve.replicas.engine.model_runner import ModelRunner
from pagedserve.replicas.engine.request import Request
from pagedserve.replicas.engine.sampler import SampleResult
from pagedserve.replicas.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.replicas.models.registry import eos_token_ids, load_tokenizer, resolve_model_dir
from pagedserve.replicas.models.spec import load_model_spec
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineStats:
    """A snapshot for routers, autoscalers and metrics."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int


class LLMEngine:
    """Continuous-batching engine over a paged KV cache; runs on CPU or one GPU, without Ray."""

    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size} is not supported yet; use 1"
            )
        self.config = config
        self.model_dir = resolve_model_dir(config.model, progress=progress)
        self.spec = load_model_spec(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.device = _device(config.device)
        self.dtype = _dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.spec, self.model_dir, self.device, self.dtype,
                                  self.eos_token_ids, progress)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        self.max_model_len = self._max_model_len()
        self.requests: dict[str, Request] = {}

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a prompt (text, or token ids) for generation; raises ValueError for bad input."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        request = Request(request_id, text, token_ids, params, self.config.block_size,
                          self.tokenizer, self.max_model_len)
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.abort()
        for seq in request.seqs:
            self.scheduler.finish(seq)
        return request.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the current output of every request that advanced."""
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return []
        result = self.runner.execute(batch)
        return self._postprocess(batch, result)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.num_prefix_hits / max(1, bm.num_prefix_queries),
            num_preemptions=self.scheduler.num_preemptions,
        )

    def _postprocess(self, batch: SchedulerOutput, result: SampleResult) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        samples = iter(zip(result.token_ids, result.logprobs, strict=True))
        for item in batch.scheduled:
            seq = item.seq
            sampled = item.samples
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.register_computed_blocks(seq)
            if not sampled:
                continue
            token_id, logprobs = next(samples)
            request = self.requests[seq.request_id]
            if logprobs is not None:
                seq.logprobs.append(logprobs)
                seq.cumulative_logprob += logprobs[token_id]
            reason = request.on_token(seq, token_id, self.eos_token_ids)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
            touched[seq.request_id] = request
        outputs = [request.output() for request in touched.values()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]
