"""The pipes that carry each step from rank 0 to the other ranks (two local processes, gloo)."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import pytest
import torch.distributed as dist
from two_ranks import run_two_ranks

from pagedserve.replicas.parallel import step_pipes

SMALL = np.arange(17, dtype=np.int64)
LARGE = np.arange(3 * step_pipes.PIPE_BYTES // 8, dtype=np.int64) * 7  # 3x a pipe's buffer


def _messages_arrive_then_end_of_file(rank: int):
    if rank == 0:
        writers = step_pipes.open_writers(2)
        writers.send(SMALL)
        writers.send(LARGE)  # the reader drains while this writes
        writers.close()
        return "sent"
    reader = step_pipes.open_reader(1)
    got = [reader.receive(len(SMALL)), reader.receive(len(LARGE))]
    ok = np.array_equal(got[0], SMALL) and np.array_equal(got[1], LARGE)
    try:
        reader.receive(1)
    except step_pipes.PeerGone as err:
        return f"equal={ok}; then {err}"
    return f"equal={ok}; then no error"


def _closed_reader_fails_the_writer(rank: int):
    if rank == 0:
        writers = step_pipes.open_writers(2)
        dist.barrier()  # rank 1 has closed its end
        try:
            writers.send(SMALL)
        except step_pipes.PeerGone as err:
            return str(err)
        return "no error"
    step_pipes.open_reader(1).close()
    dist.barrier()
    return "closed"


def _run(scenario: str) -> dict[int, str]:
    return run_two_ranks(globals()[f"_{scenario}"])


def _leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pagedserve-tp-*")))


def test_messages_larger_than_the_pipe_arrive_whole_and_nothing_stays_on_disk():
    before = _leftovers()
    out = _run("messages_arrive_then_end_of_file")
    assert out[0] == "sent"
    assert out[1] == "equal=True; then tensor-parallel rank 0 stopped: its step pipe is closed"
    assert _leftovers() == before


def test_a_follower_that_closed_its_end_fails_rank_0s_next_send_with_its_rank():
    out = _run("closed_reader_fails_the_writer")
    assert out == {0: "tensor-parallel rank 1 stopped: its step pipe is closed", 1: "closed"}


def test_writer_gives_up_when_no_follower_opens_its_pipe(tmp_path):
    path = str(tmp_path / "rank1")
    os.mkfifo(path)
    with pytest.raises(TimeoutError, match="rank 1 did not open its step pipe"):
        step_pipes._open_for_writing(path, 1, deadline=0.0)
