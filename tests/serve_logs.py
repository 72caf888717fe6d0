"""Tracebacks in a Ray cluster's Serve logs: a test that served traffic asserts there are none.
Also what the logs say about one request (which replica answered it, how its calls ended).

Serve's own log files (`logs/serve/*.log`) hold what Serve logs; what escapes it (an
exception on a future nobody awaited, a crash) goes to the Serve actor's worker stderr
(`logs/worker-*.err`, headed `:actor_name:ServeReplica:...`), so both are read.
"""

from __future__ import annotations

import time
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


def request_log_lines(logs: Path, request_id: str) -> list[str]:
    """Every line of the Serve logs that names `request_id` (Serve logs a request's id on
    each line about it, in the ingress replica's access log and in the replicas it called),
    prefixed with its file's name."""
    return [f"{path.name}: {line}" for path in sorted((logs / "serve").glob("*.log"))
            for line in path.read_text(errors="replace").splitlines() if request_id in line]


def ingress_replicas_of(logs: Path, request_ids: list[str], deployment: str = "Ingress",
                        wait_s: float = 10.0) -> dict[str, str]:
    """Request id -> the id of the `deployment` replica whose log names it (the replica that
    answered it), for the ids found within `wait_s` (a replica writes its access-log line
    after the response has gone, so the last one may not be in the file yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {}
        for path in (logs / "serve").glob(f"replica_*_{deployment}_*.log"):
            text = path.read_text(errors="replace")
            replica = path.stem.rsplit("_", 1)[1]
            found.update({rid: replica for rid in request_ids if rid in text})
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def _serve_logs(logs: Path) -> list[Path]:
    errs = [p for p in sorted(logs.glob("worker-*.err"))
            if any(actor in _head(p) for actor in SERVE_ACTORS)]
    return sorted((logs / "serve").glob("*.log")) + errs


def _head(path: Path, size: int = 512) -> str:
    with open(path, errors="replace") as f:
        return f.read(size)
