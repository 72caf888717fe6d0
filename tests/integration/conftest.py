"""A real local Ray cluster serving the default model, started the way users start it.

`serve run ray_configs/local.yaml` runs in a subprocess (it owns the Ray cluster); the test
process then joins that cluster as a second driver for handle calls and stats. Both last for
this package only: the modules after it start clusters of their own in this process.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ray_clusters import leave_ray_cluster

REPO = Path(__file__).resolve().parents[2]
PORT = 8000  # ray_configs/local.yaml's, as in the README
BASE_URL = f"http://127.0.0.1:{PORT}"
STARTUP_TIMEOUT_S = 420
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _wait_ready(proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve run exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{BASE_URL}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def _fail_if_port_taken(port: int) -> None:
    """The README's server listens on 8000: another process there would answer instead."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail(f"port {port} is already in use; the integration tests serve on it as "
                        "the README's `serve run` does: stop whatever listens there first")


@pytest.fixture(scope="package")
def server(tmp_path_factory) -> str:
    """`serve run ray_configs/local.yaml`, ready; yields the base URL."""
    _fail_if_port_taken(PORT)
    log_path = tmp_path_factory.mktemp("serve") / "serve-run.log"
    with open(log_path, "w") as log:
        serve_cli = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
        proc = subprocess.Popen([serve_cli, "run", "ray_configs/local.yaml"], cwd=REPO,
                                env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_ready(proc, log_path)
        yield BASE_URL
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], env=ENV,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="package")
def ray_driver(server):
    """This test process joined to the server's Ray cluster (for handles and stats)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="auto", logging_level="warning", log_to_driver=False)
    yield ray
    leave_ray_cluster()


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
