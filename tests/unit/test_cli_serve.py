"""`pagedserve serve` hands `serve run` the environment of the proxy mode asked for."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pagedserve.cli import main as cli_main


def test_haproxy_flag_starts_ray_in_serves_haproxy_mode(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv, env: calls.append((argv, env)) or 0)
    assert cli_main(["serve", "--haproxy"]) == 0
    assert cli_main(["serve"]) == 0
    for argv, _ in calls:
        Path(argv[-1]).unlink()  # the config it wrote for `serve run`
    (argv, haproxy_env), (_, default_env) = calls
    assert argv[-2] == "run"
    assert haproxy_env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in default_env
