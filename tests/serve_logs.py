"""Tracebacks in a Ray cluster's Serve logs: a test that served traffic asserts there are none.

Serve's own log files (`logs/serve/*.log`) hold what Serve logs; what escapes it (an
exception on a future nobody awaited, a crash) goes to the Serve actor's worker stderr
(`logs/worker-*.err`, headed `:actor_name:ServeReplica:...`), so both are read.
"""

from __future__ import annotations

from pathlib import Path

SERVE_ACTORS = (":actor_name:ServeReplica", ":actor_name:ServeController",
                ":actor_name:ProxyActor", ":actor_name:SERVE_", ":actor_name:pagedserve-")


def logs_dir() -> Path:
    """The logs directory of the Ray cluster this driver is joined to."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def serve_tracebacks(logs: Path, context: int = 1500) -> list[str]:
    """Each Serve log's first traceback (file name and `context` characters of it)."""
    found = []
    for path in _serve_logs(logs):
        text = path.read_text(errors="replace")
        if "Traceback" in text:
            at = text.index("Traceback")
            found.append(f"{path.name}: {text[at:at + context]}")
    return found


def _serve_logs(logs: Path) -> list[Path]:
    errs = [p for p in sorted(logs.glob("worker-*.err"))
            if any(actor in _head(p) for actor in SERVE_ACTORS)]
    return sorted((logs / "serve").glob("*.log")) + errs


def _head(path: Path, size: int = 512) -> str:
    with open(path, errors="replace") as f:
        return f.read(size)
