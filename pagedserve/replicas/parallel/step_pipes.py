"""One-way pipes from rank 0 to each other rank of a tensor-parallel group (one host).

At set-up rank 0 makes one named FIFO per follower in a fresh private directory and tells the
group where (one object broadcast, a collective); each follower opens its FIFO for reading and
rank 0 opens them all for writing, then removes the directory: the open ends stay connected
and nothing is left on disk. After that the kernel moves the bytes: rank 0's write returns
once they are in the pipe's buffer (it waits only while a follower is a whole buffer behind),
a follower sleeps in `read` without holding the GIL, and a dead end is seen at once (rank 0's
write fails, a follower reads end-of-file). Messages are int64 arrays; the reader knows each
one's length.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time

import numpy as np
import torch.distributed as dist

from pagedserve.replicas.parallel.group import GROUP_TIMEOUT_S

PIPE_BYTES = 1 << 20  # asked for per pipe (Linux's default limit for a user): several steps


class PeerGone(RuntimeError):
    """The other end of a step pipe closed without a stop message: that rank stopped."""


class PipeWriters:
    """Rank 0's ends: `send` writes one message to every follower."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def send(self, message: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(message, np.int64)).cast("B")
        for rank, fd in enumerate(self.fds, start=1):
            try:
                _write_all(fd, data)
            except BrokenPipeError:
                raise PeerGone(f"tensor-parallel rank {rank} stopped: its step pipe is "
                               "closed") from None

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


class PipeReader:
    """A follower's end: `receive(n)` returns the next n int64 values."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def receive(self, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            n = os.readv(self.fd, [view[got:]])
            if n == 0:
                raise PeerGone("tensor-parallel rank 0 stopped: its step pipe is closed")
            got += n
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_writers(size: int, timeout_s: float = GROUP_TIMEOUT_S) -> PipeWriters:
    """Rank 0: make and open the pipes to ranks 1..size-1 (collective with `open_reader`)."""
    directory = tempfile.mkdtemp(prefix="pagedserve-tp-")
    try:
        paths = [_fifo_path(directory, rank) for rank in range(1, size)]
        for path in paths:
            os.mkfifo(path, 0o600)
        dist.broadcast_object_list([directory], src=0)
        deadline = time.monotonic() + timeout_s
        fds = []
        try:
            for rank, path in enumerate(paths, start=1):
                fds.append(_open_for_writing(path, rank, deadline))
        except BaseException:
            PipeWriters(fds).close()
            raise
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the open ends stay connected
    return PipeWriters(fds)


def open_reader(rank: int) -> PipeReader:
    """Rank `rank` > 0: open the pipe rank 0 made for it (collective with `open_writers`)."""
    where = [None]
    dist.broadcast_object_list(where, src=0)
    return PipeReader(os.open(_fifo_path(where[0], rank), os.O_RDONLY))


def _fifo_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}")


def _open_for_writing(path: str, rank: int, deadline: float) -> int:
    """Open a FIFO's write end once its reader has opened it (until `deadline`)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as err:
            if err.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel rank {rank} did not open its step pipe "
                                   "in time") from None
            time.sleep(0.001)
    os.set_blocking(fd, True)
    # above this host's limit, the default (64 KiB) only makes rank 0 wait sooner for a
    # follower that is behind
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return fd


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]
