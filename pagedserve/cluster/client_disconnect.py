"""A client that leaves mid-stream is a disconnect, not an error with a traceback.

When an HTTP client goes away, Ray Serve's proxy cancels its side of the request, and the
ingress replica's next `receive()` (Serve's ASGI receive, which asks the proxy for the next
message) raises `TaskCancelledError`. Serve turns only a `KeyError` there into
`http.disconnect`; the cancelled call escaped Starlette's streaming response and Serve logged
a traceback for every client that left a stream. This middleware gives the app the disconnect
message the ASGI spec asks for, so the stream ends as a disconnect (its sequence is aborted in
the engine as for any other).
"""

from __future__ import annotations

from ray.exceptions import TaskCancelledError

DISCONNECT = {"type": "http.disconnect"}


class DisconnectOnCancelledReceive:
    """ASGI middleware: a `receive()` cancelled by the proxy reads as `http.disconnect`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def receive_or_disconnect():
            try:
                return await receive()
            except TaskCancelledError:
                return DISCONNECT

        await self.app(scope, receive_or_disconnect, send)
