"""Admission errors from the router reach the client as OpenAI errors, not as a hang."""

from __future__ import annotations

import asyncio

import pytest
from fake_handles import Method

from pagedserve.cluster.admission import PromptTooLargeError
from pagedserve.cluster.dispatch import Dispatcher, Job
from pagedserve.cluster.openai_errors import APIError


class RejectingRouter:
    def __init__(self) -> None:
        self.admit = Method(self._admit)

    async def _admit(self, request: dict) -> str:
        raise PromptTooLargeError("the prompt needs 9 KV-cache blocks, a replica holds 8")


class NoReplicas:
    def options(self, **_):
        return self


def test_a_prompt_no_replica_can_hold_is_a_bad_request():
    dispatcher = Dispatcher(RejectingRouter(), NoReplicas(), 16, 1)
    with pytest.raises(APIError) as caught:
        asyncio.run(dispatcher._admit(Job("r", list(range(130)), None), set()))
    assert caught.value.status == 400 and caught.value.param == "prompt"
    assert "9 KV-cache blocks" in caught.value.message
