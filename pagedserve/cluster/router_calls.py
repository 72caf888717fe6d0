"""Calls to the router actor that outlive its restart.

The router is a single Serve replica. When it dies Serve starts a new one, which learns every
replica's capacity from their next reports; what the old one held is gone. So a request that
waited in it for admission is submitted again, to the new router: its client sees a longer
wait, not an error. Notices that only updated the old router's state (a release, a failed
replica) are dropped: the new router never knew what they refer to.

A router that Serve replaces (a redeploy) is alive but gets no more capacity reports, so it
could never admit what it holds: it answers each such call with `ROUTER_REPLACED`, and those
are submitted again to its successor too. (An answer, not an exception: Serve logs every
exception a call raises, with its traceback, and this is no error.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

logger = logging.getLogger(__name__)

ROUTER_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
ROUTER_REPLACED = "router-replaced"  # a router's answer: submit the call to its successor
ROUTER_RESTART_WAIT_S = 60.0  # Serve notices a dead replica at its next health check
RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0)  # then every second


async def call_router(method, *args, wait_s: float = ROUTER_RESTART_WAIT_S):
    """`await method.remote(*args)`, submitted again while the router is gone or answers
    `ROUTER_REPLACED`, for `wait_s` at most; raises the router's last error after that. The
    router's own errors pass through."""
    deadline = time.monotonic() + wait_s
    for attempt in itertools.count():
        try:
            answer = await method.remote(*args)
            if answer != ROUTER_REPLACED:
                return answer
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the router was replaced and no successor answered within "
                                   f"{wait_s:.0f} s")
            if attempt == 0:
                logger.info("the router is being replaced; submitting again to its successor")
        except ROUTER_GONE as err:
            if time.monotonic() >= deadline:
                raise
            if attempt == 0:
                logger.warning("the router is gone (%r); submitting again to its successor", err)
        await asyncio.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])


async def tell_router(method, *args) -> None:
    """`await method.remote(*args)` for a notice; dropped (logged) if the router is gone."""
    try:
        await method.remote(*args)
    except ROUTER_GONE as err:
        logger.warning("router gone; dropped its %s notice: %r", method, err)
