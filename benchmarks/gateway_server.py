"""The gateway the cache benchmarks measure: a redis-server and a gateway config under `serve run`,
behind Serve's own HTTP proxy or in Serve's HAProxy mode, each on free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pagedserve.bench import serve_process
from pagedserve.bench.serve_process import free_port

try:
    from benchmarks.serving import ENV, REPO
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`
    from serving import ENV, REPO

READY_TIMEOUT_S = 900


def start_redis(port: int, log: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    raise SystemExit(f"redis-server did not start:\n{log.read_text()}")


def start_gateway(config: Path, tmp: Path, redis_url: str,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`serve run` of the config with its HTTP port and Redis address replaced, and `env`
    added to its environment (Serve's proxy mode); returns it once `/readyz` answers 200."""
    spec = yaml.safe_load(config.read_text())
    port = free_port()
    spec["http_options"]["port"] = port
    args = spec["applications"][0]["args"]
    args["cache"]["redis_url"] = redis_url
    if args.get("auth", {}).get("redis_url"):
        args["auth"]["redis_url"] = redis_url
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)],
                            cwd=REPO, env={**ENV, **(env or {})}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    return proc, url


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until `url/readyz` answers 200; exits if `serve run` dies or time runs out."""
    try:
        serve_process.wait_ready(url, proc, log, READY_TIMEOUT_S)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
