"""A tensor-parallel group uses symmetric memory only if its ranks' processes have made the same
number of rendezvous: torch keys them by a per-process count, so a rank 0 that served an earlier
group would wait forever for a new rank 1 (two gloo ranks; the GPU path itself is in tests/gpu)."""

from __future__ import annotations

import torch
from two_ranks import run_two_ranks

from pagedserve.replicas.parallel import symmetric_all_reduce
from pagedserve.replicas.parallel.layers import TensorParallel


def _agrees_after(rank: int, calls_by_rank: tuple[int, int]) -> bool:
    symmetric_all_reduce._rendezvous_calls = calls_by_rank[rank]
    return TensorParallel(rank, 2, torch.device("cpu")).symmetric_history_agrees()


def test_ranks_with_different_rendezvous_histories_do_not_use_symmetric_memory():
    assert run_two_ranks(_agrees_after, (2, 0)) == {0: False, 1: False}
    assert run_two_ranks(_agrees_after, (0, 2)) == {0: False, 1: False}


def test_ranks_with_the_same_history_do():
    assert run_two_ranks(_agrees_after, (0, 0)) == {0: True, 1: True}
    assert run_two_ranks(_agrees_after, (2, 2)) == {0: True, 1: True}
