"""Stand-ins for Ray handle methods in tests that run the ingress's dispatch without Ray."""

from __future__ import annotations


class Method:
    """`handle.method.remote(...)` calling a plain function (an async one returns its coroutine)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)
