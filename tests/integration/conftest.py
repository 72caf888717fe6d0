"""A real local Ray cluster serving the default model, started the way users start it.

`serve run ray_configs/local.yaml` runs in a subprocess (it owns the Ray cluster); the test
process then joins that cluster as a second driver for handle calls and stats. Both last for
this package only: the modules after it start clusters of their own in this process.
"""

import os
import socket
from pathlib import Path

import pytest
from ray_clusters import leave_ray_cluster
from serve_cli import serve_run

from pagedserve.bench.serve_process import ray_address

REPO = Path(__file__).resolve().parents[2]
PORT = 8000  # ray_configs/local.yaml's, as in the README
BASE_URL = f"http://127.0.0.1:{PORT}"
STARTUP_TIMEOUT_S = 420


def _fail_if_port_taken(port: int) -> None:
    """The README's server listens on 8000: another process there would answer instead."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail(f"port {port} is already in use; the integration tests serve on it as "
                        "the README's `serve run` does: stop whatever listens there first")


_SERVED: dict[str, str] = {}  # the served cluster's Ray address, for the second driver


@pytest.fixture(scope="package")
def server(tmp_path_factory) -> str:
    """`serve run ray_configs/local.yaml`, ready; yields the base URL."""
    _fail_if_port_taken(PORT)
    log_path = tmp_path_factory.mktemp("serve") / "serve-run.log"
    with serve_run(REPO / "ray_configs" / "local.yaml", BASE_URL, log_path,
                   STARTUP_TIMEOUT_S) as proc:
        _SERVED["address"] = ray_address(proc)
        yield BASE_URL


@pytest.fixture(scope="package")
def ray_driver(server):
    """This test process joined to the server's Ray cluster (for handles and stats)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=_SERVED["address"], logging_level="warning", log_to_driver=False)
    yield ray
    leave_ray_cluster()


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
