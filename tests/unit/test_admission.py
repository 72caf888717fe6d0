"""The router's admission queue: late binding, FIFO within priority, affinity with a bound."""

import pytest

from pagedserve.cluster.admission import (
    AdmissionQueue,
    AdmissionRequest,
    PromptTooLargeError,
    QueueFullError,
    ReplicaReport,
)
from pagedserve.config import RouterConfig
from pagedserve.replicas.engine.block_manager import BlockManager, prompt_block_hashes
from pagedserve.replicas.engine.sequence import Sequence
from pagedserve.sampling_params import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def report(rid: str, running: int = 0, waiting: int = 0, free: int = 100, max_seqs: int = 4,
           **kw) -> ReplicaReport:
    return ReplicaReport(rid, max_seqs, running, waiting, free, 100, 16, **kw)


def make_queue(**config) -> tuple[AdmissionQueue, Clock]:
    clock = Clock()
    defaults = {"max_waiting_per_replica": 0, "imbalance_bound": 2}
    return AdmissionQueue(RouterConfig(**{**defaults, **config}), clock), clock


def request(rid: str, tokens: int = 20, hashes=(), priority: int = 0) -> AdmissionRequest:
    return AdmissionRequest(rid, tokens, list(hashes), priority)


def test_busy_replica_is_skipped_and_request_waits_in_router_until_room():
    q, _ = make_queue()
    q.report(report("A", running=4))
    q.report(report("B", running=3))
    q.enqueue(request("r1"))
    q.enqueue(request("r2"))
    assert q.assign() == [("r1", "B")]  # A is full; B has one slot
    assert len(q) == 1  # r2 waits here, not in a replica
    q.report(report("A", running=3))  # A frees a slot: r2 is placed at once
    assert q.assign() == [("r2", "A")]


def test_reservations_count_until_the_replica_confirms_them():
    q, _ = make_queue()
    q.report(report("A", running=2, max_seqs=3))
    q.enqueue(request("r1"))
    q.enqueue(request("r2"))
    assert q.assign() == [("r1", "A")]  # the reservation fills A's last slot
    q.report(report("A", running=3, max_seqs=3, received_ids=["r1"]))
    assert q.replicas["A"].reserved == {}
    assert q.assign() == []
    q.report(report("A", running=2, max_seqs=3))
    assert q.assign() == [("r2", "A")]
    q.release("A", "r2")  # it never reached the replica
    assert q.replicas["A"].load == 2


def test_kv_room_is_required():
    q, _ = make_queue()
    q.report(report("A", free=3))  # 3 blocks of 16 tokens
    q.enqueue(request("big", tokens=100))  # needs 7 blocks
    assert q.assign() == []
    q.report(report("A", free=10))
    assert q.assign() == [("big", "A")]


def test_fifo_within_priority_and_lower_priority_value_first():
    q, _ = make_queue()
    for rid, prio in [("a", 1), ("b", 0), ("c", 1), ("d", 0)]:
        q.enqueue(request(rid, priority=prio))
    q.report(report("A", max_seqs=10))
    assert [r for r, _ in q.assign()] == ["b", "d", "a", "c"]


def test_head_of_queue_is_not_overtaken():
    q, _ = make_queue()
    q.report(report("A", free=3))
    q.enqueue(request("big", tokens=100))
    q.enqueue(request("small", tokens=5))
    assert q.assign() == []  # small fits but must not jump the queue


def test_cancelled_request_is_skipped_and_queue_limit_holds():
    q, _ = make_queue(max_queue_len=2)
    q.enqueue(request("a"))
    q.enqueue(request("b"))
    with pytest.raises(QueueFullError):
        q.enqueue(request("c"))
    q.cancel("a")
    q.report(report("A"))
    assert q.assign() == [("b", "A")]


def test_prefix_affinity_prefers_the_replica_holding_the_prefix():
    q, _ = make_queue()
    prefix = [11, 22, 33]
    q.report(report("A", running=1, block_hashes=prefix))
    q.report(report("B", running=0))
    q.enqueue(request("r", hashes=prefix + [44]))
    assert q.assign() == [("r", "A")]  # A holds 3 leading blocks, despite more load


def test_affinity_yields_to_least_loaded_beyond_the_imbalance_bound():
    q, _ = make_queue(imbalance_bound=2)
    prefix = [11, 22, 33]
    q.report(report("A", running=3, max_seqs=8, block_hashes=prefix))
    q.report(report("B", running=0, max_seqs=8))
    q.enqueue(request("r", hashes=prefix))
    assert q.assign() == [("r", "B")]  # A's load 3 > B's 0 + 2


def test_requests_sharing_a_new_prefix_follow_the_first_one():
    q, _ = make_queue()
    q.report(report("A"))
    q.report(report("B"))
    prefix = [7, 8, 9]
    q.enqueue(request("first", hashes=prefix))
    q.enqueue(request("second", hashes=prefix + [10]))
    placed = dict(q.assign())
    assert placed["first"] == placed["second"]  # the pending reservation counts as held


def test_silent_replicas_and_unconfirmed_reservations_expire():
    q, clock = make_queue(stale_after_s=5)
    q.report(report("A"))
    q.enqueue(request("r"))
    assert q.assign() == [("r", "A")]
    clock.now = 3
    q.report(report("B"))
    clock.now = 7
    q.assign()
    assert set(q.replicas) == {"B"}


def test_excluded_replicas_are_not_chosen():
    q, _ = make_queue()
    q.report(report("A"))
    q.report(report("B", running=2))
    q.enqueue(AdmissionRequest("r", 10, [], 0, frozenset({"A"})))
    assert q.assign() == [("r", "B")]


def test_draining_replica_gets_nothing():
    q, _ = make_queue()
    q.report(report("A", draining=True))
    q.enqueue(request("r"))
    assert q.assign() == []


def test_prompt_block_hashes_match_what_the_block_manager_registers():
    block_size = 4
    tokens = list(range(100, 111))  # 2 full blocks and a partial one
    bm = BlockManager(num_blocks=8, block_size=block_size)
    seq = Sequence("s", 0, tokens, SamplingParams(max_tokens=1), block_size)
    assert bm.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.register_computed_blocks(seq)
    assert prompt_block_hashes(tokens, block_size) == seq.block_hashes[:2]
    assert set(prompt_block_hashes(tokens, block_size)) <= bm.cached_block_hashes()


def test_a_retired_replica_gets_nothing_even_when_it_reports_room_again():
    q, _ = make_queue()
    q.report(report("A"))
    q.report(report("B", running=3))
    q.set_retired({"A"})  # Serve is stopping A: drain it
    q.report(report("A"))  # it keeps reporting while its streams finish
    q.enqueue(request("r1"))
    q.enqueue(request("r2"))
    assert q.assign() == [("r1", "B")]  # r2 waits for B rather than go to A
    q.set_retired(set())  # A is gone from Serve's list: the set does not grow forever
    assert q.retired == set() and "A" not in q.replicas


def test_a_prompt_no_replica_could_ever_hold_is_rejected_not_left_blocking_the_queue():
    q, _ = make_queue()
    q.report(report("A", free=3))  # a busy replica whose whole cache is 100 blocks
    q.enqueue(request("huge", tokens=100 * 16))  # needs 101 blocks with its first new token
    q.enqueue(request("small", tokens=5))
    assert q.assign() == [("small", "A")]  # the one behind it is not stuck
    [(request_id, error)] = q.take_rejected()
    assert request_id == "huge" and isinstance(error, PromptTooLargeError)
    assert "101 KV-cache blocks" in str(error) and len(q) == 0
    assert q.take_rejected() == []


def test_a_prompt_waits_while_no_replica_reports_its_capacity():
    q, _ = make_queue()
    q.enqueue(request("huge", tokens=100 * 16))
    assert q.assign() == [] and q.take_rejected() == []  # nothing known yet (scaled to zero)
    q.report(report("A", free=3))
    assert q.assign() == [] and len(q.take_rejected()) == 1


def test_requests_queued_for_a_version_that_lost_a_rollout_wait_for_the_winner():
    q, _ = make_queue()
    q.report(report("old", running=4, version="stable"))  # full: its requests wait here
    q.report(report("new", running=4, version="canary"))
    for rid, version in (("r1", "stable"), ("r2", "canary"), ("r3", "stable")):
        q.enqueue(AdmissionRequest(rid, 20, version=version))
    assert q.assign() == []
    q.retarget("stable", "canary")  # the canary was promoted: the old replicas will stop
    q.report(report("old", running=0, version="stable"))
    assert q.assign() == []  # the old replica has room, but gets nothing new
    q.report(report("new", running=1, version="canary"))
    assert q.assign() == [("r1", "new"), ("r2", "new"), ("r3", "new")]
