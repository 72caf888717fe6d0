"""The test clusters' start: one retry when Ray's raylet never registers, nothing else retried."""

from __future__ import annotations

import pytest
import ray
import ray_clusters

TIMED_OUT = Exception("The current node timed out during startup. This could happen because "
                      "some of the raylet failed to startup or the GCS has become overloaded.")


def _fake_ray(monkeypatch, failures: list[Exception]) -> list[str]:
    calls: list[str] = []

    def init(**kwargs):
        calls.append("init")
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return calls


def test_a_raylet_that_never_registers_gets_one_more_start(monkeypatch):
    calls = _fake_ray(monkeypatch, [TIMED_OUT])
    with pytest.warns(UserWarning, match="starting it again"):
        ray_clusters._start_local_cluster(num_cpus=2)
    assert calls == ["init", "shutdown", "init"]


def test_a_second_timeout_and_other_errors_are_raised(monkeypatch):
    _fake_ray(monkeypatch, [TIMED_OUT, TIMED_OUT])
    with pytest.warns(UserWarning), pytest.raises(Exception, match="timed out during startup"):
        ray_clusters._start_local_cluster(num_cpus=2)
    calls = _fake_ray(monkeypatch, [ValueError("bad num_cpus")])
    with pytest.raises(ValueError):
        ray_clusters._start_local_cluster(num_cpus=2)
    assert calls == ["init"]


GCS_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc")


def _fake_cluster(monkeypatch, failures: list[Exception]) -> list[str]:
    from ray import cluster_utils

    calls: list[str] = []

    def cluster(**kwargs):
        calls.append("head")
        if failures:
            raise failures.pop(0)
        return "cluster"

    monkeypatch.setattr(cluster_utils, "Cluster", cluster)
    monkeypatch.setattr(ray_clusters, "_stop_unregistered_head", lambda: calls.append("stop"))
    return calls


def test_a_head_whose_gcs_never_starts_gets_one_more_start(monkeypatch):
    calls = _fake_cluster(monkeypatch, [GCS_TIMEOUT])
    with pytest.warns(UserWarning, match="starting it again"):
        assert ray_clusters._start_head(0) == "cluster"
    assert calls == ["head", "stop", "head"]


def test_a_second_head_timeout_and_other_errors_are_raised(monkeypatch):
    _fake_cluster(monkeypatch, [GCS_TIMEOUT, GCS_TIMEOUT])
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="Timed out waiting"):
        ray_clusters._start_head(0)
    calls = _fake_cluster(monkeypatch, [RuntimeError("something else")])
    with pytest.raises(RuntimeError, match="something else"):
        ray_clusters._start_head(0)
    assert calls == ["head"]
