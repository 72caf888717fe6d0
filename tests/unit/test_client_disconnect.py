"""A receive cancelled by Serve's proxy (the client left) reaches the app as a disconnect."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import TaskCancelledError

from pagedserve.cluster.client_disconnect import DisconnectOnCancelledReceive


def _run(scope_type: str, receive):
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())

    asyncio.run(DisconnectOnCancelledReceive(app)({"type": scope_type}, receive, None))
    return seen


def test_a_cancelled_receive_is_a_disconnect_message():
    async def cancelled():
        raise TaskCancelledError()

    assert _run("http", cancelled) == [{"type": "http.disconnect"}]


def test_other_messages_and_errors_pass_through():
    async def body():
        return {"type": "http.request", "body": b"{}"}

    assert _run("http", body) == [{"type": "http.request", "body": b"{}"}]

    async def broken():
        raise ValueError("not a cancellation")

    with pytest.raises(ValueError, match="not a cancellation"):  # never swallowed
        _run("http", broken)
