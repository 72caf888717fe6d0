"""Streaming load through an app handle (or over HTTP) while a test breaks something, and what
became of every request: sent, succeeded, or ended with an error before or after its first
token.

A request counts as started once its client saw a token: from then on a failure is visible
to it as a cut-off answer, before that it must be re-admitted somewhere (or was lost).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from pagedserve.cluster.openai_sse import sse_data


@dataclass
class Outcome:
    """One request's life, in seconds on the monotonic clock."""

    sent_at: float
    first_token_at: float | None = None
    ended_at: float | None = None
    completion_tokens: int = 0
    error: str | None = None

    @property
    def started(self) -> bool:
        return self.first_token_at is not None


@dataclass
class Load:
    """`concurrency` clients, each sending one streaming completion after the other."""

    handle: object
    body: dict
    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set, then wait for the requests in flight to end."""
        await asyncio.gather(*(self._client(stop) for _ in range(self.concurrency)))

    def counts(self, since: float = 0.0) -> dict[str, int]:
        """The tallies of the requests sent at or after `since`."""
        chosen = [o for o in self.outcomes if o.sent_at >= since]
        return {"sent": len(chosen),
                "succeeded": sum(o.error is None for o in chosen),
                "errored_before_start": sum(o.error is not None and not o.started for o in chosen),
                "errored_after_start": sum(o.error is not None and o.started for o in chosen)}

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def _chunks(self, body: dict):
        """The streamed chunk dicts of one request."""
        return self.handle.options(stream=True).completions.remote(body)

    async def _client(self, stop: asyncio.Event) -> None:
        body = {**self.body, "stream": True, "stream_options": {"include_usage": True}}
        while not stop.is_set():
            outcome = Outcome(sent_at=time.monotonic())
            self.outcomes.append(outcome)
            try:
                async for chunk in self._chunks(body):
                    if outcome.first_token_at is None and chunk.get("choices"):
                        outcome.first_token_at = time.monotonic()
                    if chunk.get("usage"):
                        outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                if outcome.completion_tokens != body["max_tokens"]:
                    outcome.error = f"incomplete: {outcome.completion_tokens} tokens"
            except Exception as err:  # noqa: BLE001 (recorded: the test judges it)
                outcome.error = f"{type(err).__name__}: {str(err)[-300:]}"
            outcome.ended_at = time.monotonic()


@dataclass
class HttpLoad(Load):
    """`Load` over HTTP: `handle` is the server's base URL; a plain client, no retries. Each
    request opens a connection of its own: a kept-alive one that the server closes while idle
    would fail the next request on it for a reason that is no fault's."""

    async def run(self, stop: asyncio.Event) -> None:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.handle, timeout=120, limits=limits) as http:
            self._http = http
            await super().run(stop)

    async def _chunks(self, body: dict):
        async with self._http.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
            async for line in reply.aiter_lines():
                if (chunk := sse_data(line)) is not None:
                    if "error" in chunk:
                        raise RuntimeError(f"error event: {chunk['error']}")
                    yield chunk


async def with_load(load: Load, fault, settle_s: float, warm_s: float = 1.0) -> float:
    """Run `load`; after `warm_s`, call `fault()` (in a thread: it may block); keep the load
    going `settle_s` longer, then stop it and wait for the requests in flight. Returns the
    moment of the fault."""
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    await asyncio.sleep(warm_s)
    fault_at = time.monotonic()
    await asyncio.to_thread(fault)
    await asyncio.sleep(settle_s)
    stop.set()
    await asyncio.wait_for(running, timeout=180)
    return fault_at
