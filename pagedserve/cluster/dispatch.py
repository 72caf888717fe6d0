"""From the ingress to a replica: admission through the router, then the replica's delta stream.

A request that fails because its replica died before producing anything is admitted again
elsewhere (the router is told the replica failed); one that already streamed tokens is not
retried, since its client has seen part of an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import context as serve_context

from pagedserve.cluster.admission import PromptTooLargeError, QueueFullError
from pagedserve.cluster.openai_errors import APIError
from pagedserve.cluster.rollout import CANARY
from pagedserve.cluster.router_calls import call_router, tell_router
from pagedserve.outputs import RequestOutput
from pagedserve.replicas.engine.block_manager import prompt_block_hashes
from pagedserve.replicas.engine.engine_client import EngineDeadError
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
WAKE_AFTER_S = 1.0  # an admission waiting this long checks that some replica exists at all
# A replica whose engine stopped (e.g. a tensor-parallel rank died) is as good as gone; Ray
# re-raises the replica's EngineDeadError as an instance of it.
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, EngineDeadError)


@dataclass
class Job:
    """One engine request: a prompt (token ids) and how to sample it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


class Dispatcher:
    """Admits jobs through the router actor and streams their deltas from the chosen replica."""

    def __init__(self, router, replicas, block_size: int, retry_after_s: int,
                 hot_prefix_tokens: int = 0, canary_replicas=None,
                 admission: bool = True) -> None:
        """`hot_prefix_tokens`: how many leading prompt tokens the router gets with each
        request, to count hot prefixes that new replicas prefill (0: none).
        `canary_replicas`: the handle of a new model version's replicas, when a rollout runs:
        the router then picks the version of each request and hears how it ended.
        `admission=False` (`router.policy: serve`): the router actor is not asked; each call
        goes to the replicas unpinned, for Serve's own request router to place."""
        self.router = router
        self.admission = admission
        self.hot_prefix_tokens = hot_prefix_tokens
        self.replicas = replicas.options(stream=True)
        self.canary_replicas = (canary_replicas.options(stream=True)
                                if canary_replicas is not None else None)
        self._wake_handle = replicas
        self.block_size = block_size
        self.retry_after_s = retry_after_s

    async def stream(self, job: Job) -> AsyncIterator[RequestOutput]:
        """Yield the job's deltas; re-route it if its replica dies before the first one."""
        failed: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            replica_id, version = await self._place(job, failed)
            started = False
            try:
                async for delta in self._judged(version, self._call(job, replica_id, attempt,
                                                                    version)):
                    started = True
                    yield delta
                return
            except _REPLICA_GONE as err:
                if replica_id is not None:
                    await tell_router(self.router.replica_failed, replica_id)
                if started:  # its client saw part of an answer: report, don't retry
                    raise APIError(503, f"the replica running this request failed after it "
                                   f"started: {_cause_message(err)}", "service_unavailable",
                                   None, "replica_failed") from err
                logger.warning("replica %s died before %s started: %r; re-routing",
                               replica_id, job.request_id, err)
                if replica_id is not None:
                    failed.add(replica_id)
        raise APIError(503, f"no replica could run the request after {MAX_ATTEMPTS} attempts",
                       "service_unavailable", None, "replica_failed")

    async def _admit(self, job: Job, failed: set[str]) -> str:
        return (await self._admit_versioned(job, failed))[0]

    async def _place(self, job: Job, failed: set[str]) -> tuple[str | None, str | None]:
        """The replica the router admits `job` to, and its version; (None, None) when
        Serve's request router places the call instead (no admission)."""
        if not self.admission:
            return None, None
        return await self._admit_versioned(job, failed)

    async def _admit_versioned(self, job: Job, failed: set[str]) -> tuple[str, str | None]:
        """The replica that runs `job`, and its model version while a rollout runs."""
        request = {
            "request_id": job.request_id,
            "num_prompt_tokens": len(job.prompt_token_ids),
            "block_hashes": prompt_block_hashes(job.prompt_token_ids, self.block_size),
            "priority": job.priority,
            "exclude": sorted(failed),
        }
        if self.hot_prefix_tokens and not failed:  # count each request once
            request["prefix_tokens"] = job.prompt_token_ids[:self.hot_prefix_tokens]
        admission = asyncio.ensure_future(self._admit_call(request))  # (replica, version)
        wake = None
        try:
            done, _ = await asyncio.wait({admission}, timeout=WAKE_AFTER_S)
            if not done:  # beside the admission: a replica of another version may admit it
                wake = asyncio.ensure_future(self._wake_if_no_replica())
            return await admission
        except QueueFullError as err:
            raise APIError.overloaded(self.retry_after_s, str(err)) from None
        except PromptTooLargeError as err:
            raise APIError.bad_request(_cause_message(err), "prompt") from None
        finally:
            admission.cancel()  # no-op once done; else the client left: leave the queue
            if wake is not None:
                wake.cancel()

    async def _admit_call(self, request: dict) -> tuple[str, str | None]:
        if self.canary_replicas is None:
            return await call_router(self.router.admit, request), None
        replica_id, version = await call_router(self.router.admit_versioned, request)
        return replica_id, version

    async def _judged(self, version: str | None,
                      deltas: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """`deltas`, telling the router how the request ended when a rollout judges `version`:
        a server-side failure counts against it; a client leaving, or its bad input, does not."""
        if version is None:
            async for delta in deltas:
                yield delta
            return
        started, ttft_s = time.monotonic(), None
        try:
            async for delta in deltas:
                if ttft_s is None:
                    ttft_s = time.monotonic() - started
                yield delta
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except APIError as err:
            if err.status >= 500:
                await tell_router(self.router.record_outcome, version, False, ttft_s)
            raise
        except Exception:
            await tell_router(self.router.record_outcome, version, False, ttft_s)
            raise
        await tell_router(self.router.record_outcome, version, True, ttft_s)

    async def _wake_if_no_replica(self) -> None:
        """With `min_replicas: 0` the deployment may have no replica: the request waits in the
        router, where Serve does not see it. A call queued on the replica handle does count for
        Serve's autoscaler, which then starts a replica; the call returns once one is up.
        It runs beside the admission, which it must never fail: its errors are logged."""
        try:
            await self._wake()
        except Exception as err:  # noqa: BLE001 (the admission goes on without it)
            logger.warning("could not wake a replica: %r", err)

    async def _wake(self) -> None:
        if await self.router.num_ready_replicas.remote() == 0:
            logger.info("no replica is running; waiting for one to start")
            started = time.monotonic()
            with own_serve_request():
                ready = self._wake_handle.ready.remote()
            await ready
            logger.warning("waited %.2f s for a replica to start (scaled to zero)",
                           time.monotonic() - started)

    async def _call(self, job: Job, replica_id: str | None, attempt: int,
                    version: str | None = None) -> AsyncIterator[RequestOutput]:
        """The replica's deltas: pinned to `replica_id`, or unpinned when it is None."""
        engine_request_id = job.request_id if attempt == 0 else f"{job.request_id}-retry{attempt}"
        replicas = self.canary_replicas if version == CANARY else self.replicas
        pin = {} if replica_id is None else {"target_replica": replica_id}
        with own_serve_request():
            stream = replicas.generate.remote(
                job.prompt_token_ids, job.params, engine_request_id, **pin)
        delivered = completed = False
        try:
            async for delta in stream:
                delivered = True
                yield delta
            completed = True
        finally:
            if not completed:  # the client left or the call failed: stop the replica's work
                stream.cancel()
            if not delivered and replica_id is not None:  # its admission reserved room
                await asyncio.shield(tell_router(self.router.release, replica_id,
                                                 job.request_id))


def _cause_message(err: Exception) -> str:
    """The message of the router's own exception, without the remote traceback Ray adds."""
    return str(getattr(err, "cause", None) or err)


@contextlib.contextmanager
def own_serve_request() -> Iterator[None]:
    """Make the handle calls issued inside (synchronously) Serve requests of their own.

    Serve stamps every handle call made while serving a request with that request's internal
    id, and its request router indexes the calls waiting for a replica by that id, keeping only
    the first. When several calls of one request wait at once (one per prompt of a completions
    request), the pinned router, which lacks the FIFO fallback of Serve's default router, hands
    a replica to the indexed call only: the others never reach their replica, and each keeps
    one of the handle's few routing tasks (two per replica) busy, until no call is routed.
    The client-facing request id is kept, so logs still tie the calls to their request; Serve's
    cancellation of a parent's calls no longer covers them, which is why `_call` cancels its
    own stream when the caller leaves.
    """
    parent = serve_context._get_serve_request_context()
    token = serve_context._serve_request_context.set(
        replace(parent, _internal_request_id=str(uuid.uuid4())))
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding `(stream index, item)` as items arrive."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except BaseException as err:  # handed to the consumer, which re-raises it
            await queue.put((index, err))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
