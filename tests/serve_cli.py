"""`serve run <config>` in a subprocess, as users start pagedserve, for tests that need it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.bench import serve_process

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def serve_run(config: Path | str, base_url: str, log_path: Path, timeout_s: float = 420,
              env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Run `serve run config` until `base_url/readyz` answers 200; stop it and Ray after."""
    serve_cli = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([serve_cli, "run", str(config)], cwd=REPO,
                                env={**ENV, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, base_url, log_path, timeout_s)
        yield proc
    finally:
        stop(proc)


def wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float) -> None:
    try:
        serve_process.wait_ready(base_url, proc, log_path, timeout_s)
    except RuntimeError as err:
        pytest.fail(str(err))


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the `serve run` group (as Ctrl-C), then make sure its Ray cluster is gone; other
    Ray clusters on this machine are left alone."""
    serve_process.stop_serve_run(proc)
