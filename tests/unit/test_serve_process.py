"""Stopping a `serve run` ends its own process tree and nothing else on the machine."""

from __future__ import annotations

import subprocess
import sys

import psutil

from pagedserve.bench.serve_process import HAPROXY_MODE_PORTS, haproxy_environment, stop_serve_run

SLEEP = "import time; time.sleep(600)"
# A child that left the process group and ignores Ctrl-C, as a daemon could.
STUBBORN_CHILD = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "time.sleep(600)")
PARENT = ("import subprocess, sys, time; "
          f"subprocess.Popen([sys.executable, '-c', {STUBBORN_CHILD!r}], start_new_session=True); "
          "print('up', flush=True); time.sleep(600)")


def test_stop_ends_the_tree_even_a_child_outside_its_group_but_nothing_else():
    bystander = subprocess.Popen([sys.executable, "-c", SLEEP], start_new_session=True)
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == b"up\n"
        (child,) = psutil.Process(proc.pid).children()
        stop_serve_run(proc, grace_s=10)
        assert proc.returncode is not None
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None  # another cluster's process: untouched
    finally:
        bystander.kill()
        bystander.wait()


def test_haproxy_mode_moves_every_fixed_port_to_a_distinct_free_one():
    env = haproxy_environment()
    assert env.pop("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    ports = [int(env[name]) for name in HAPROXY_MODE_PORTS]
    assert len(set(ports)) == 4 and all(port > 1024 for port in ports)
