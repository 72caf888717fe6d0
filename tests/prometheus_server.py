"""A real Prometheus server (the Debian `prometheus` package) for tests: a free port, a scrape
config for the given targets every second (with a bearer token where given), its data in a
temporary directory."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagedserve.replicas.parallel.rendezvous import free_port

READY_TIMEOUT_S = 60


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now (raises on a PromQL error)."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if answer.get("status") != "success":
            raise ValueError(f"Prometheus rejected {expr!r}: {answer.get('error')}")
        return answer["data"]["result"]

    def targets_up(self) -> bool:
        answer = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        active = answer["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


@contextlib.contextmanager
def prometheus(targets: list[str], workdir: Path,
               bearer_token: str | None = None) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port, path /metrics) every second, ready; stopped
    after. `bearer_token`: sent as `Authorization: Bearer ...` on every scrape."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is missing: apt-get install -y prometheus")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    auth = f"    authorization: {{credentials: {bearer_token!r}}}\n" if bearer_token else ""
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ray\n{auth}    static_configs:\n"
        f"      - targets: {targets!r}\n")
    log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, workdir / "prometheus.log")
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"prometheus not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
