"""The staging ring's chunk plan: whole rows, as few chunks as fit, none when a row is too big."""

from __future__ import annotations

import pytest

from pagedserve.replicas.models.device_copy import plan_chunks


@pytest.mark.parametrize(("rows", "row_bytes", "buffer_bytes", "chunks"), [
    (10, 100, 1000, [(0, 10)]),  # all in one buffer
    (10, 100, 400, [(0, 4), (4, 8), (8, 10)]),  # a short last chunk
    (9, 100, 300, [(0, 3), (3, 6), (6, 9)]),  # exact
    (3, 100, 199, [(0, 1), (1, 2), (2, 3)]),  # one row a chunk
    (3, 200, 199, []),  # a row larger than a buffer: the caller splits each row
    (0, 100, 400, []),  # nothing to copy
])
def test_chunks_cover_every_row_once_within_the_buffer(rows, row_bytes, buffer_bytes, chunks):
    assert plan_chunks(rows, row_bytes, buffer_bytes) == chunks
    covered = [r for start, stop in chunks for r in range(start, stop)]
    assert covered == (list(range(rows)) if chunks else [])
    assert all((stop - start) * row_bytes <= buffer_bytes for start, stop in chunks)
