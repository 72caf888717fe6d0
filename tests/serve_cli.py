"""`serve run <config>` in a subprocess, as users start pagedserve, for tests that need it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagedserve.bench.serve_process import stop_serve_run

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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"server not ready after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the `serve run` group (as Ctrl-C), then make sure its Ray cluster is gone; other
    Ray clusters on this machine are left alone."""
    stop_serve_run(proc)
