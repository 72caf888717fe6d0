"""Which of a raylet's workers a new actor can take, and the preload setting's environment."""

from __future__ import annotations

from ray.core.generated import common_pb2

from pagedserve.replicas.node.warm_workers import PRELOAD_ENV, count_idle, preload_environment

JOB, OTHER_JOB = bytes.fromhex("01000000"), bytes.fromhex("02000000")
NIL_ACTOR = b"\xff" * 16


def _worker(**fields) -> common_pb2.CoreWorkerStats:
    base = {"worker_type": common_pb2.WORKER, "job_id": JOB, "actor_id": NIL_ACTOR,
            "num_executed_tasks": 0, "num_running_tasks": 0}
    return common_pb2.CoreWorkerStats(**{**base, **fields})


def test_only_never_used_workers_of_the_job_count():
    stats = [
        _worker(),  # idle, never used: counts
        _worker(actor_id=b""),  # an unset actor id is no actor either: counts
        _worker(job_id=OTHER_JOB),  # another job's
        _worker(actor_id=bytes(range(16))),  # holds an actor
        _worker(num_executed_tasks=1),  # ran a task: Ray gives it no actor
        _worker(num_running_tasks=1),
        _worker(worker_type=common_pb2.DRIVER),
    ]
    assert count_idle(stats, JOB) == 2
    assert count_idle(stats, OTHER_JOB) == 1


def test_preload_environment_keeps_an_existing_setting(monkeypatch):
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    assert preload_environment() == {PRELOAD_ENV: "ray.serve._private.replica"}
    monkeypatch.setenv(PRELOAD_ENV, "mymodule")
    assert preload_environment() == {PRELOAD_ENV: "mymodule"}
