"""Parked replicas: the router un-parks one the moment the queue needs it, parks the extra one
only after its hold, and keeps the serving count at Serve's target minus the parked ones."""

import pytest
from test_admission import Clock, report, request

from pagedserve.cluster.admission import AdmissionQueue
from pagedserve.cluster.parking import Parking
from pagedserve.config import RouterConfig


def parked_queue(parked: int = 1, serving: int = 1, hold_s: float = 10.0):
    clock = Clock()
    parking = Parking(parked, serving, hold_s, clock)
    queue = AdmissionQueue(RouterConfig(max_waiting_per_replica=0), clock, parking)
    return queue, parking, clock


def test_replicas_beyond_the_serving_target_start_parked_and_get_nothing():
    q, parking, _ = parked_queue()
    q.report(report("A"))
    q.report(report("B"))
    assert parking.parked == {"B"}
    q.enqueue(request("r1"))
    assert q.assign() == [("r1", "A")]  # B has room but is parked


def test_the_queue_unparks_a_replica_at_once_when_no_serving_one_has_room():
    q, parking, _ = parked_queue()
    q.report(report("A", running=4))  # full
    q.report(report("B"))
    q.enqueue(request("r1"))
    assert q.assign() == [("r1", "B")]  # no tick, no Serve call: the same assign
    assert parking.parked == set() and parking.num_unparked == 1


def test_no_unpark_while_a_serving_replica_has_room():
    q, parking, _ = parked_queue()
    q.report(report("A", running=3))
    q.report(report("B"))
    q.enqueue(request("r1"))
    assert q.assign() == [("r1", "A")]
    assert parking.parked == {"B"}


def test_an_unparked_replica_keeps_serving_until_its_hold_ends():
    """Serve's target lags an un-park: until the hold ends, nothing is parked again (parking
    the other, busy replica then would take the capacity the burst just got)."""
    q, parking, clock = parked_queue(hold_s=10.0)
    q.report(report("A", running=4))
    q.report(report("B"))
    q.enqueue(request("r1"))
    q.assign()
    q.report(report("B", running=1, received_ids=["r1"]))
    clock.now = 5.0
    q.rebalance_parking()
    assert parking.parked == set()
    q.report(report("A", running=0))
    clock.now = 11.0
    q.rebalance_parking()
    assert parking.parked == {"A"}  # the target is still one serving: the idler one parks


def test_a_caught_up_target_keeps_both_serving_after_the_hold():
    q, parking, clock = parked_queue(hold_s=10.0)
    q.report(report("A", running=4))
    q.report(report("B"))
    q.enqueue(request("r1"))
    q.assign()
    parking.set_deployment_target(3)  # the autoscaler saw two serving: two plus one parked
    clock.now = 11.0
    q.rebalance_parking()
    assert parking.parked == set()


def test_a_lost_serving_replica_is_replaced_by_a_parked_one():
    q, parking, _ = parked_queue()
    q.report(report("A"))
    q.report(report("B"))
    q.remove_replica("A")
    q.rebalance_parking()
    assert parking.parked == set() and "B" in q.replicas


def test_serve_target_counts_the_parked_ones():
    q, parking, _ = parked_queue(parked=1, serving=1, hold_s=0.0)
    for rid in "ABC":
        q.report(report(rid))
    assert parking.parked == {"B", "C"}
    parking.set_deployment_target(3)  # the autoscaler wants two serving
    q.rebalance_parking()
    assert len(parking.parked) == 1
    parking.set_deployment_target(2)
    q.rebalance_parking()
    assert len(parking.parked) == 2


def test_without_parking_every_replica_serves():
    q, parking, _ = parked_queue(parked=0)
    q.report(report("A"))
    q.report(report("B"))
    assert not parking.enabled and parking.parked == set()


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="parked"):
        Parking(-1, 1, 0.0, Clock())
