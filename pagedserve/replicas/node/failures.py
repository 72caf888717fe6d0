"""How a node service's failure is told in one log line."""

from __future__ import annotations


def short_error(err: BaseException) -> str:
    """The error's type and its last line: for an actor that died, that names the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:400]
