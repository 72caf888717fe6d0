"""Continuous batching: one token budget per step, decodes first, chunked prefills, preemption."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedserve.replicas.engine.block_manager import BlockManager
from pagedserve.replicas.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step
    # Fixed when scheduled (the engine advances the sequence as soon as the step is launched):
    # whether this chunk reaches the sequence's end, and whether the step then yields its next
    # token (not when no output is allowed: `max_tokens=0`).
    reaches_end: bool = field(init=False)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        seq = self.seq
        self.reaches_end = seq.num_computed_tokens + self.num_tokens == len(seq)
        self.samples = self.reaches_end and len(seq) < seq.max_len


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # single-token rows first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if s.num_tokens == 1)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Decides which sequences run in the next step and how many tokens each computes.

    Running sequences go first (decodes cost one token each), then waiting ones are admitted
    in FIFO order while the token budget, the batch size and free blocks allow. When a running
    sequence cannot grow, the newest running sequence is preempted: its blocks are freed and
    it is recomputed later (the prefix cache usually makes that cheap).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, budget)
        out.scheduled.sort(key=lambda s: s.num_tokens != 1)
        return out

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if seq.all_tokens_sampled:
                continue  # its last token is still on the device; it finishes when that lands
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, num_tokens, out):
                out.scheduled.append(ScheduledSeq(seq, num_tokens))
                budget -= num_tokens
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        target = seq.num_computed_tokens + num_tokens
        while not self.block_manager.allocate(seq, target):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            if not seq.ready_to_schedule:
                continue
            num_tokens = self._admit_one(seq, budget)
            if num_tokens == 0:
                return  # FIFO: nobody overtakes a sequence that does not fit yet
            out.scheduled.append(ScheduledSeq(seq, num_tokens))
            budget -= num_tokens

    def _admit_one(self, seq: Sequence, budget: int) -> int:
        bm = self.block_manager
        bm.match_prefix(seq)
        num_tokens = min(seq.num_uncomputed_tokens, budget)
        fits_budget = self.enable_chunked_prefill or num_tokens == seq.num_uncomputed_tokens
        if not fits_budget or not bm.allocate(seq, seq.num_computed_tokens + num_tokens):
            bm.free(seq)
            seq.reset_for_recompute()
            return 0
        bm.record_admission(seq)
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return num_tokens
