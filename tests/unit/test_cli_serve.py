"""`pagedserve serve` hands `serve run` the environment of the proxy mode asked for."""

from __future__ import annotations

from pathlib import Path

from pagedserve import cli
from pagedserve.cli import main as cli_main


class FinishedChild:
    """`serve run` as Popen returns it; `interrupts` Ctrl-Cs arrive while it is waited for."""

    def __init__(self, argv, env, interrupts: int = 0, status: int = 0) -> None:
        self.argv, self.env, self.interrupts, self.status = argv, env, interrupts, status

    def wait(self) -> int:
        if self.interrupts:
            self.interrupts -= 1
            raise KeyboardInterrupt
        return self.status


def test_haproxy_flag_starts_ray_in_serves_haproxy_mode(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    calls = []
    monkeypatch.setattr(cli, "_start_serve_run",
                        lambda argv, env: calls.append((argv, env)) or FinishedChild(argv, env))
    assert cli_main(["serve", "--haproxy"]) == 0
    assert cli_main(["serve"]) == 0
    for argv, _ in calls:
        Path(argv[-1]).unlink()  # the config it wrote for `serve run`
    (argv, haproxy_env), (_, default_env) = calls
    assert argv[-2] == "run"
    assert haproxy_env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in default_env


def test_ctrl_c_waits_for_serve_run_to_stop_and_returns_its_status(monkeypatch):
    """Ctrl-C goes to `serve run` as well: `pagedserve serve` waits for it to shut Serve down
    and exits with its status, not with a KeyboardInterrupt traceback."""
    children = []

    def popen(argv, env):
        children.append(FinishedChild(argv, env, interrupts=2, status=130))
        return children[-1]

    monkeypatch.setattr(cli, "_start_serve_run", popen)
    assert cli_main(["serve"]) == 130
    assert children[0].interrupts == 0
    Path(children[0].argv[-1]).unlink()
