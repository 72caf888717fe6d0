"""Wall time of each phase a replica goes through before it is ready (no Ray here)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Named phases in the order they ran, each with its wall time in seconds.

    `sync` runs before a phase is stopped (e.g. `torch.cuda.synchronize`), so work a phase
    queued on a device is charged to it rather than to the next one.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.phases: dict[str, float] = {}
        self._sync = sync

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def update(self, phases: dict[str, float]) -> None:
        for name, seconds in phases.items():
            self.add(name, seconds)


def format_phases(phases: dict[str, float]) -> str:
    """`weights 1.20 s, kv_cache 0.10 s, ...` for logs."""
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
