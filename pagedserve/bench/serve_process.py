"""A `serve run` child process for benchmarks and tests: waiting until it serves, the Ray
cluster it started, Serve's HAProxy mode on free ports, and a stop that ends only that
cluster's processes.

`serve run` without an address starts a local Ray cluster whose daemons (GCS, raylet, the
workers under it, HAProxy under its manager actor) all descend from the `serve run` process.
Several such clusters may run on one machine at once, so neither `ray stop --force` (every Ray
process on the machine) nor `ray.init(address="auto")` (the newest cluster, maybe another's)
is safe: both are replaced here by the `serve run` process's own tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from pagedserve.replicas.parallel.rendezvous import free_port

# Serve's HAProxy mode, read by Ray Serve when Ray starts (ray/serve/_private/constants.py).
HAPROXY_MODE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# A request whose ingress replica died before answering is retried on another one (Serve's
# default retries connection failures only); `pagedserve-haproxy` keeps requests buffered so
# HAProxy can (`pagedserve/haproxy_launch.py` says why). Requests up to 64 KiB.
HAPROXY_RETRY_ON = "conn-failure empty-response"
HAPROXY_BUFFER_BYTES = 65536
GRACE_S = 60  # for `serve run` to shut Serve and its Ray cluster down after Ctrl-C
# Ports Serve's HAProxy mode binds besides the HTTP port, fixed by default (Ray 2.60's
# `ray/serve/_private/constants.py`); the ingress replicas' own ports (30000 and up) Serve
# moves on from when taken.
HAPROXY_MODE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                      "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def haproxy_mode_environment() -> dict[str, str]:
    """Environment for Ray to start Serve in HAProxy mode, with `pagedserve-haproxy` as its
    HAProxy and empty responses retried; a setting already in the environment is kept."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "pagedserve-haproxy")
    launcher = beside_python if os.path.exists(beside_python) else (
        shutil.which("pagedserve-haproxy") or beside_python)
    ours = {**HAPROXY_MODE_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": launcher,
            "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
            "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(HAPROXY_BUFFER_BYTES)}
    return {key: os.environ.get(key, value) for key, value in ours.items()}


def haproxy_environment() -> dict[str, str]:
    """Environment for a `serve run` in Serve's HAProxy mode, every fixed port it would bind
    beside the HTTP port (HAProxy's stats and metrics pages, Serve's fallback proxy) moved
    to a free one, so it can start next to other clusters on this machine."""
    ports: set[int] = set()
    while len(ports) < len(HAPROXY_MODE_PORTS):
        ports.add(free_port())
    moved = zip(HAPROXY_MODE_PORTS, map(str, ports), strict=True)
    return {**haproxy_mode_environment(), **dict(moved)}


def fallback_proxy_url(env: dict[str, str]) -> str:
    """The URL of Serve's own HTTP proxy that HAProxy mode keeps on the head node."""
    return f"http://127.0.0.1:{env['RAY_SERVE_FALLBACK_PROXY_HTTP_PORT']}"


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Until `url/readyz` answers 200. RuntimeError, with the end of `serve run`'s log, if it
    exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}:\n"
                               f"{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} not ready after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


def ray_address(proc: subprocess.Popen) -> str:
    """The GCS address (`ip:port`) of the Ray cluster that `serve run` (`proc`) started. The
    GCS picks its port when it starts and writes it into the session directory."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.name() != "gcs_server":
                continue
            args = dict(arg.split("=", 1) for arg in child.cmdline()
                        if arg.startswith("--") and "=" in arg)
        except psutil.Error:
            continue
        port_file = next(Path(args["--session-dir"]).glob("gcs_server_port_*"))
        return f"{args['--node-ip-address']}:{port_file.read_text().strip()}"
    raise RuntimeError(f"serve run (pid {proc.pid}) has no GCS process: did it start Ray?")


def stop_serve_run(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """Ctrl-C the `serve run` process group (started with `start_new_session=True`); then
    kill whatever of its process tree outlived it (processes that left the group, or a
    shutdown that hung)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(tree, timeout=10)


@contextlib.contextmanager
def joined_cluster(proc: subprocess.Popen) -> Iterator[None]:
    """This process as a driver of the Ray cluster that `serve run` (`proc`) started, while
    inside (for deployment handles: a router's stats), left cleanly after."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # as `serve run` is started by benchmarks
    ray.init(address=ray_address(proc), logging_level="warning", log_to_driver=False)
    try:
        yield
    finally:
        leave_ray_cluster()


def leave_ray_cluster() -> None:
    """Disconnect this driver and drop what Serve keeps of the cluster in the process.

    Serve keeps routing state after `ray.shutdown()`: its router event-loop thread, one
    long-poll client per controller, and its controller client with the deployment handles it
    made. It reuses that client while the job id matches, and a new cluster's first job has
    the id the last cluster's had: handle calls made on the next cluster joined then went to
    the old cluster's actors, or waited forever. So a process that is the driver of several
    clusters in turn leaves each through here.
    """
    import ray
    from ray.serve import context as serve_context
    from ray.serve._private.router import SharedRouterLongPollClient

    client = serve_context._global_client
    if client is not None and ray.is_initialized():
        client.shutdown_cached_handles()
    serve_context._disconnect()
    ray.shutdown()
    SharedRouterLongPollClient.get_or_create.cache_clear()
