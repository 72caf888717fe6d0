"""Scheduler: token budget, decodes first, chunked prefill, preemption, FIFO admission, siblings."""

from __future__ import annotations

import itertools
import random

import pytest

from pagedserve.replicas.engine.block_manager import BlockManager
from pagedserve.replicas.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from pagedserve.replicas.engine.sequence import Sequence, SequenceStatus
from pagedserve.sampling_params import SamplingParams

BS = 4


class Harness:
    """A scheduler plus a fake engine step that does what the engine's postprocess does."""

    def __init__(self, num_blocks: int = 64, budget: int = 16, max_num_seqs: int = 8,
                 chunked: bool = True, prefix_caching: bool = True) -> None:
        self.bm = BlockManager(num_blocks, BS, prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget, chunked)
        self.budget = budget
        self.max_num_seqs = max_num_seqs
        self._tokens = itertools.count(10_000)
        self._prompt_base = itertools.count(0, 1000)
        self.finished: list[Sequence] = []

    def add(self, prompt_len: int, max_tokens: int = 4, tokens: list[int] | None = None,
            leader: Sequence | None = None) -> Sequence:
        if tokens is None:  # distinct per sequence, so nothing matches by accident
            base = next(self._prompt_base)
            tokens = list(range(base, base + prompt_len))
        seq = Sequence(f"r{len(self.sched.waiting)}", 0 if leader is None else 1, tokens,
                       SamplingParams(max_tokens=max_tokens), BS)
        seq.leader = leader
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        assert out.num_tokens <= self.budget
        assert len(self.sched.running) <= self.max_num_seqs
        seqs = [s.seq for s in out.scheduled]
        assert len(set(map(id, seqs))) == len(seqs)
        for item in out.scheduled:
            seq = item.seq
            assert seq.status == SequenceStatus.RUNNING and seq in self.sched.running
            assert item.num_tokens >= 1
            assert seq.num_computed_tokens + item.num_tokens <= len(seq)
            assert len(seq.block_table) * BS >= seq.num_computed_tokens + item.num_tokens
        for seq in out.preempted:
            assert seq not in seqs and seq in self.sched.waiting
        for item in out.scheduled:
            seq = item.seq
            samples = item.samples
            seq.num_computed_tokens += item.num_tokens
            self.bm.register_computed_blocks(seq)
            if samples:
                seq.append_token(next(self._tokens))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.finish(seq)
                    self.finished.append(seq)
        return out

    def run(self, max_steps: int = 500) -> list[SchedulerOutput]:
        outs = []
        while self.sched.has_work():
            assert len(outs) < max_steps, "scheduler made no progress"
            outs.append(self.step())
        return outs


def chunks_of(outs: list[SchedulerOutput], seq: Sequence) -> list[int]:
    return [s.num_tokens for out in outs for s in out.scheduled if s.seq is seq]


# budget and chunking


def test_budget_respected_and_everything_finishes_randomized():
    rng = random.Random(0)
    h = Harness(num_blocks=40, budget=16, max_num_seqs=4)
    seqs = [h.add(rng.randrange(1, 60), max_tokens=rng.randrange(1, 9)) for _ in range(14)]
    outs = h.run()
    assert any(out.num_tokens == 16 for out in outs)  # the budget was actually binding
    for seq in seqs:
        assert seq.is_finished
        assert seq.num_output_tokens == seq.params.max_tokens
    assert h.bm.num_free_blocks == h.bm.num_blocks
    assert not h.sched.running and not h.sched.waiting


@pytest.mark.parametrize("chunked", [True, False])
def test_tight_cache_preempts_and_still_finishes_randomized(chunked):
    rng = random.Random(1)
    h = Harness(num_blocks=12, budget=24, max_num_seqs=4, chunked=chunked)
    seqs = []
    for _ in range(16):
        leader = h.add(rng.randrange(1, 21), max_tokens=rng.randrange(1, 13))
        seqs.append(leader)
        if rng.random() < 0.3:
            seqs.append(h.add(leader.num_prompt_tokens, max_tokens=rng.randrange(1, 13),
                              tokens=list(leader.token_ids), leader=leader))
    h.run(max_steps=1000)
    assert h.sched.num_preemptions > 0
    for seq in seqs:
        assert seq.is_finished and seq.num_output_tokens == seq.params.max_tokens
    assert h.bm.num_free_blocks == h.bm.num_blocks
    assert all(b.ref_count == 0 for b in h.bm.blocks)


def test_chunked_prefill_splits_a_long_prompt():
    h = Harness(budget=16)
    seq = h.add(50, max_tokens=3)
    sizes, samples, tables = [], [], []
    while not seq.is_finished:
        out = h.step()
        (item,) = out.scheduled
        sizes.append(item.num_tokens)
        samples.append(seq.num_output_tokens)
        tables.append(len(seq.block_table))
    assert sizes == [16, 16, 16, 2, 1, 1]
    assert samples == [0, 0, 0, 1, 2, 3]  # a token is sampled only once the prompt is done
    assert tables[:3] == [4, 8, 12]  # blocks grow with the chunks, not all at admission


def test_scheduled_seq_samples_only_at_the_end():
    seq = Sequence("r", 0, list(range(10)), SamplingParams(), BS)
    assert not ScheduledSeq(seq, 9).samples
    assert ScheduledSeq(seq, 10).samples
    seq.num_computed_tokens = 6
    assert ScheduledSeq(seq, 4).samples
    assert not ScheduledSeq(seq, 3).samples


def test_decodes_are_scheduled_before_a_new_prefill():
    h = Harness(budget=8)
    decoders = [h.add(2, max_tokens=10) for _ in range(3)]
    h.step()  # three prompts of two tokens
    long = h.add(40, max_tokens=1)
    out = h.step()
    assert [s.seq for s in out.scheduled] == [*decoders, long]
    assert [s.num_tokens for s in out.scheduled] == [1, 1, 1, 5]
    assert out.num_decodes == 3 and out.num_tokens == 8


def test_running_decodes_are_never_starved_by_a_chunked_prefill():
    h = Harness(budget=8)
    a = h.add(2, max_tokens=30)
    h.step()
    b = h.add(100, max_tokens=1)
    outs = [h.step() for _ in range(10)]
    for out in outs:
        assert out.scheduled[0].seq is a and out.scheduled[0].num_tokens == 1
    assert chunks_of(outs, b) == [7] * 10


def test_output_lists_single_token_rows_first():
    h = Harness(budget=64)
    prefill = h.add(20, max_tokens=5)
    decode = h.add(3, max_tokens=5)
    # A mid-prefill sequence ahead of a decoding one in the running list.
    for seq, computed in ((prefill, 8), (decode, 3)):
        assert h.bm.allocate(seq, computed)
        seq.num_computed_tokens = computed
        seq.status = SequenceStatus.RUNNING
        h.sched.running.append(seq)
        h.sched.waiting.remove(seq)
    decode.append_token(7)
    out = h.sched.schedule()
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(decode, 1), (prefill, 12)]
    assert out.num_decodes == 1


def test_unchunked_prefill_waits_for_room_in_the_budget():
    h = Harness(budget=16, chunked=False)
    a = h.add(4, max_tokens=3)
    h.step()
    b = h.add(16, max_tokens=1)
    c = h.add(2, max_tokens=1)  # fits, but must not overtake b
    out = h.step()
    assert [s.seq for s in out.scheduled] == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == []
    assert list(h.sched.waiting) == [b, c]
    h.step()  # a's last decode
    assert a.is_finished
    out = h.step()
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(b, 16)]


def test_chunked_prefill_uses_the_leftover_budget_instead():
    h = Harness(budget=16, chunked=True)
    a = h.add(4, max_tokens=3)
    h.step()
    b = h.add(16, max_tokens=1)
    out = h.step()
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]


def test_max_num_seqs_is_respected():
    h = Harness(budget=64, max_num_seqs=2)
    seqs = [h.add(3, max_tokens=3) for _ in range(5)]
    out = h.step()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert len(h.sched.running) == 2
    outs = h.run()
    assert all(len(o.scheduled) <= 2 for o in outs)
    assert all(seq.is_finished for seq in seqs)
    # FIFO: each sequence finished no later than the ones added after it.
    assert h.finished == seqs


def test_fifo_admission_order():
    h = Harness(budget=64)
    seqs = [h.add(n) for n in (5, 9, 2, 7)]
    out = h.step()
    assert [s.seq for s in out.scheduled] == seqs
    assert h.sched.running == seqs


def test_a_sequence_that_does_not_fit_blocks_the_ones_behind_it():
    h = Harness(num_blocks=6, budget=64)
    big_running = h.add(15, max_tokens=20)  # 4 blocks
    h.step()
    big = h.add(12)  # needs 3 blocks, 2 free
    small = h.add(3)  # would fit, but must wait its turn
    out = h.step()
    assert [s.seq for s in out.scheduled] == [big_running]
    assert list(h.sched.waiting) == [big, small]
    assert big.block_table == [] and small.block_table == []
    assert h.bm.num_free_blocks == 2


# preemption


def test_preemption_frees_the_newest_sequence_and_it_resumes():
    h = Harness(num_blocks=4, budget=32)
    a = h.add(7, max_tokens=6)
    b = h.add(7, max_tokens=6)
    h.step()  # both prompts: two blocks each, the cache is full
    h.step()  # both decode within their blocks
    assert h.bm.num_free_blocks == 0
    b_tokens = list(b.token_ids)
    out = h.step()  # a needs a third block
    assert out.preempted == [b]
    assert [s.seq for s in out.scheduled] == [a]
    assert h.sched.running == [a]
    assert list(h.sched.waiting) == [b]
    assert b.status == SequenceStatus.WAITING
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert b.token_ids == b_tokens  # generated tokens are kept for recompute
    assert h.sched.num_preemptions == 1
    assert len(a.block_table) == 3
    h.run()
    assert a.is_finished and b.is_finished
    assert b.num_output_tokens == 6
    assert b.token_ids[:9] == b_tokens
    assert h.bm.num_free_blocks == 4


def test_preempted_prompt_prefix_is_matched_when_resumed():
    h = Harness(num_blocks=5, budget=32)
    a = h.add(3, max_tokens=6)  # one block, grows to a second
    b = h.add(6, max_tokens=3)  # two blocks, never grows
    c = h.add(7, max_tokens=3)  # two blocks, both full after the second step
    h.step()
    h.step()
    c_tokens = list(c.token_ids)
    out = h.step()  # a needs a block: c (newest) goes, not b
    assert out.preempted == [c]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert h.sched.waiting[0] is c
    outs = h.run()
    resumed = [s for o in outs for s in o.scheduled if s.seq is c]
    assert c.is_finished and c.num_output_tokens == 3
    assert c.token_ids[:len(c_tokens)] == c_tokens
    # a took c's last block; c's first block was still cached, so only 5 of 9 are recomputed.
    assert c.num_cached_tokens == 4
    assert resumed[0].num_tokens == len(c_tokens) - 4
    assert h.bm.num_free_blocks == 5


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    h = Harness(num_blocks=3, budget=32)
    a = h.add(5, max_tokens=10)  # two blocks
    b = h.add(3, max_tokens=10)  # one block
    h.step()
    h.step()
    out = h.step()  # b needs a second block; b is the newest
    assert out.preempted == [b]
    assert [s.seq for s in out.scheduled] == [a]
    assert h.sched.waiting[0] is b and b.block_table == []


def test_preempted_sequence_goes_back_to_the_front_of_waiting():
    h = Harness(num_blocks=4, budget=32)
    h.add(7, max_tokens=6)
    b = h.add(7, max_tokens=6)
    h.step()
    h.step()
    late = h.add(1, max_tokens=1)
    out = h.step()
    assert out.preempted == [b]
    assert late not in [s.seq for s in out.scheduled]
    assert list(h.sched.waiting) == [b, late]


# siblings


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_sibling_waits_for_leader_prompt_then_shares_its_blocks(prefix_caching):
    h = Harness(budget=8, prefix_caching=prefix_caching)
    leader = h.add(18, max_tokens=4)
    sibling = h.add(18, max_tokens=4, tokens=list(leader.token_ids), leader=leader)
    leader_done_before = []
    while sibling.status == SequenceStatus.WAITING:
        assert len(leader_done_before) < 10
        leader_done_before.append(leader.num_computed_tokens >= leader.num_prompt_tokens)
        out = h.step()
        if sibling.status == SequenceStatus.WAITING:
            assert sibling not in [s.seq for s in out.scheduled]
    # Admitted in the first step that began with the leader's whole prompt computed.
    assert leader_done_before == [False, False, False, True]
    first = [s for s in out.scheduled if s.seq is sibling]
    assert first, "the sibling is scheduled in the step it is admitted"
    assert sibling.num_cached_tokens == 16
    assert sibling.block_table[:4] == leader.block_table[:4]
    assert first[0].num_tokens == 2
    h.run()
    assert leader.num_output_tokens == sibling.num_output_tokens == 4
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_waiting_sibling_does_not_block_later_requests():
    h = Harness(budget=8)
    leader = h.add(18, max_tokens=2)
    sibling = h.add(18, tokens=list(leader.token_ids), leader=leader)
    other = h.add(3, max_tokens=2)
    h.step()
    h.step()
    out = h.step()  # leader's last 2 prompt tokens; the sibling is not ready yet
    assert sibling.status == SequenceStatus.WAITING
    assert [s.seq for s in out.scheduled] == [leader, other]


# finish


def test_finish_frees_blocks_of_a_running_sequence():
    h = Harness(num_blocks=16, budget=32)
    a = h.add(9, max_tokens=10)
    b = h.add(5, max_tokens=10)
    h.step()
    assert h.bm.num_free_blocks == 16 - 3 - 2
    h.sched.finish(a)
    assert a.is_finished and a.block_table == []
    assert h.sched.running == [b]
    assert h.bm.num_free_blocks == 16 - 2
    out = h.step()
    assert [s.seq for s in out.scheduled] == [b]


def test_finish_removes_a_waiting_sequence():
    h = Harness(budget=32)
    a = h.add(4)
    h.sched.finish(a)
    assert a.is_finished
    assert not h.sched.has_work()
    assert h.sched.schedule().scheduled == []
    assert h.bm.num_free_blocks == h.bm.num_blocks


def test_repeated_prompt_hits_the_prefix_cache():
    h = Harness(budget=64)
    tokens = list(range(100, 121))
    first = h.add(21, max_tokens=1, tokens=tokens)
    h.run()
    assert first.num_cached_tokens == 0
    second = h.add(21, max_tokens=1, tokens=tokens)
    out = h.step()
    assert second.num_cached_tokens == 20
    assert [s.num_tokens for s in out.scheduled] == [1]
    assert h.bm.num_prefix_hits == 20 and h.bm.num_prefix_queries == 42
