"""The engine's readiness warm-up: every kind of step runs once before the engine is ready.

On a GPU the first step of each kind would otherwise pay for first use inside the first
requests: Triton compiles (or loads from the node's cache) each kernel variant a step needs,
about a second per compile, and CUDA loads each torch kernel's module the first time it runs
(the sampler's sort, scatter and random draws). The kernels take their step-to-step integers
unspecialized (`kernels/triton_*.py`), so the kinds of step below are all the variants there
are: prefills with and without a cached prefix, chunked prefills, mixed prefill and decode
steps, decodes through the CUDA graphs and eagerly above the largest graph, and every sampling
path. The requests are synthetic token ids; the counters they move are reset afterwards.
"""

from __future__ import annotations

import logging
import random

import torch

from pagedserve.replicas.engine.scheduler import SchedulerOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_STEPS = 10_000  # far more than the warm-up needs; guards against a scheduler that stalls
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
EVERY_SAMPLER_PATH = SamplingParams(
    n=2, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
    presence_penalty=0.1, frequency_penalty=0.1, logprobs=2, seed=1, max_tokens=4,
    ignore_eos=True)
UNSEEDED = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)


def warm_up(engine) -> set[str]:
    """Run synthetic requests through `engine` until each kind of step has run; return the
    kinds that ran (see `step_kinds`). Leaves no request, and the statistics as they were."""
    kinds: set[str] = set()
    runner = engine.runner
    launch = runner.execute_async

    def observed(batch: SchedulerOutput):
        largest = runner.graphs.max_batch if runner.graphs is not None else None
        kinds.update(step_kinds(batch, runner._graph_size(batch) is not None, largest))
        return launch(batch)

    runner.execute_async = observed
    try:
        _WarmUp(engine).run()
    finally:
        del runner.execute_async  # back to the class's method
        _reset_counters(engine)
    logger.info("warm-up ran steps of kinds %s", sorted(kinds))
    return kinds


def step_kinds(batch: SchedulerOutput, in_graph: bool, largest_graph: int | None) -> set[str]:
    """The kinds of work in one step (its batch before the engine advances it); `largest_graph`
    is the largest captured decode batch (None: no graphs)."""
    kinds = set()
    prefills = [s for s in batch.scheduled if s.num_tokens > 1]
    decodes = len(batch.scheduled) - len(prefills)
    if prefills and decodes:
        kinds.add("mixed")
    if decodes and not prefills:
        kinds.add("decode_graph" if in_graph else "decode_eager")
        if largest_graph is not None and decodes > largest_graph:
            kinds.add("decode_above_graphs")
    for item in prefills:
        seq = item.seq
        if seq.num_computed_tokens == 0:
            kinds.add("prefill")
        elif seq.num_computed_tokens == seq.num_cached_tokens and seq.num_cached_tokens:
            kinds.add("prefill_cached_prefix")
        else:
            kinds.add("prefill_chunk")  # continues a chunk of the same sequence
        if not item.samples:
            kinds.add("prefill_chunk")
    for item in batch.scheduled:
        if item.samples:
            p = item.seq.params
            kinds.add("sample_greedy" if p.temperature == 0 else "sample_random")
            if p.logprobs is not None:
                kinds.add("sample_logprobs")
    return kinds


class _WarmUp:
    """The synthetic requests, sized from the engine's limits."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.block_size = engine.config.block_size
        self.max_len = engine.max_model_len
        self.rng = random.Random(0)
        self.low = min(10, engine.spec.vocab_size - 1)  # skip special ids, as prompts would
        self.count = 0

    def run(self) -> None:
        bs = self.block_size
        first = self.prompt(2 * bs + 3)
        self.add(first, GREEDY)  # prefill alone, then graph (or eager) decodes
        self.add(self.prompt(bs + 1), EVERY_SAMPLER_PATH)
        self.steps(2)
        # joins the decodes: a mixed step, whose prefill starts after a cached prefix
        self.add(first[: 2 * bs] + self.prompt(3), UNSEEDED)
        self.steps(1)
        self.add_chunked()
        self.add_above_largest_graph()
        self.steps(MAX_STEPS)

    def prompt(self, length: int) -> list[int]:
        length = max(1, min(length, self.max_len - 9))  # room for the tokens generated
        vocab = self.engine.spec.vocab_size
        return [self.rng.randrange(self.low, vocab) for _ in range(length)]

    def add(self, prompt: list[int], params: SamplingParams) -> None:
        self.count += 1
        self.engine.add_request(f"warmup-{self.count}", prompt, params)

    def steps(self, limit: int) -> None:
        for _ in range(limit):
            if not self.engine.has_unfinished_requests():
                return
            self.engine.step(stream=False)
        if limit == MAX_STEPS:
            raise RuntimeError(f"the warm-up did not finish within {MAX_STEPS} steps")

    def add_chunked(self) -> None:
        """Prompts that overflow one step's token budget, so one of them is chunked."""
        config = self.engine.config
        if not config.enable_chunked_prefill:
            return
        length = min(config.max_num_batched_tokens + self.block_size + 1, self.max_len - 9)
        count = config.max_num_batched_tokens // length + 1
        if not self.has_blocks(count, length):
            logger.info("warm-up: no room in the KV cache for a chunked prefill")
            return
        for _ in range(count):
            self.add(self.prompt(length), SamplingParams(temperature=0, max_tokens=2,
                                                         ignore_eos=True))

    def add_above_largest_graph(self) -> None:
        """One decode step wider than the largest CUDA graph runs eagerly."""
        graphs = self.engine.runner.graphs
        if graphs is None or self.engine.config.max_num_seqs <= graphs.max_batch:
            return
        count = graphs.max_batch + 1
        if not self.has_blocks(count, self.block_size // 2):
            logger.info("warm-up: no room in the KV cache for %d sequences", count)
            return
        for _ in range(count):
            self.add(self.prompt(self.block_size // 2), SamplingParams(
                temperature=0, max_tokens=3, ignore_eos=True))

    def has_blocks(self, count: int, length: int) -> bool:
        needed = count * (-(-(length + 9) // self.block_size))
        return needed <= self.engine.block_manager.num_free_blocks // 2


def _reset_counters(engine) -> None:
    for request_id in list(engine.requests):
        engine.abort(request_id)
    engine.block_manager.num_prefix_queries = 0
    engine.block_manager.num_prefix_hits = 0
    engine.scheduler.num_preemptions = 0
    engine.num_steps, engine.step_seconds = 0, 0.0
    torch.manual_seed(engine.config.seed)  # unseeded sampling as if no warm-up had run
