"""The Grafana dashboard: generated from the metric list, committed as generated, valid against
Grafana's dashboard model, and pushed idempotently (against a stand-in Grafana server)."""

import json
import socket
from pathlib import Path

import jsonschema
import pytest
from grafana_standin import GrafanaStandIn

from pagedserve.cli import main
from pagedserve.cluster.grafana_dashboard import dashboard, dashboard_json, panel_metrics
from pagedserve.cluster.grafana_panels import PANELS, ROWS
from pagedserve.cluster.grafana_push import GrafanaPushError, push_dashboard
from pagedserve.metric_list import METRICS

COMMITTED = Path(__file__).resolve().parents[2] / "ray_configs" / "grafana" / "pagedserve.json"
_GRID = {"type": "object", "required": ["h", "w", "x", "y"],
         "properties": {"h": {"type": "integer", "minimum": 1},
                        "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        "x": {"type": "integer", "minimum": 0, "maximum": 23},
                        "y": {"type": "integer", "minimum": 0}}}
_DATASOURCE_REF = {"type": "object", "required": ["type", "uid"],
                   "properties": {"type": {"const": "prometheus"},
                                  "uid": {"const": "${datasource}"}}}
_TARGET = {"type": "object", "required": ["refId", "expr", "datasource"],
           "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"},
                          "expr": {"type": "string", "minLength": 1},
                          "legendFormat": {"type": "string"},
                          "datasource": _DATASOURCE_REF}}
# The parts of Grafana's dashboard JSON model (schemaVersion 39) that import and rendering rely
# on: required dashboard fields, row and time-series panels, their targets, and a template
# variable of type `datasource` that every query refers to.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {
            "type": "array",
            "contains": {"type": "object", "required": ["name", "type", "query"],
                         "properties": {"name": {"const": "datasource"},
                                        "type": {"const": "datasource"},
                                        "query": {"const": "prometheus"}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {"oneOf": [
            {"type": "object", "required": ["type", "id", "title", "gridPos", "panels"],
             "properties": {"type": {"const": "row"}, "id": {"type": "integer"},
                            "gridPos": _GRID, "panels": {"type": "array"}}},
            {"type": "object",
             "required": ["type", "id", "title", "gridPos", "datasource", "targets",
                          "fieldConfig"],
             "properties": {"type": {"const": "timeseries"}, "id": {"type": "integer"},
                            "gridPos": _GRID, "datasource": _DATASOURCE_REF,
                            "fieldConfig": {"type": "object", "required": ["defaults"]},
                            "targets": {"type": "array", "minItems": 1, "items": _TARGET}}},
        ]}},
    },
}


def test_committed_dashboard_is_the_generated_one():
    assert COMMITTED.read_text() == dashboard_json(), (
        "ray_configs/grafana/pagedserve.json is stale: run "
        "`pagedserve grafana --out ray_configs/grafana/pagedserve.json`")


def test_cli_output_passes_the_dashboard_schema(tmp_path):
    out = tmp_path / "f.json"
    assert main(["grafana", "--out", str(out)]) == 0
    model = json.loads(out.read_text())
    jsonschema.validate(model, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert rows == list(ROWS)
    cells = set()
    for p in model["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for dx in range(g["w"]):
            for dy in range(g["h"]):
                assert (g["x"] + dx, g["y"] + dy) not in cells, f"{p['title']} overlaps"
                cells.add((g["x"] + dx, g["y"] + dy))


def test_every_metric_has_a_panel_and_every_panel_reads_the_list():
    drawn = set().union(*(panel_metrics(p) for p in PANELS))
    assert {m.name for m in METRICS} - drawn == set()
    for panel in PANELS:
        assert panel_metrics(panel), panel.title
        assert panel.row in ROWS


def test_push_creates_then_overwrites_into_one_folder():
    with GrafanaStandIn(token="good") as grafana:
        first = push_dashboard(grafana.url, "good", folder="LLM serving")
        second = push_dashboard(grafana.url, "good", folder="LLM serving")
        assert (first["status"], first["version"]) == ("success", 1)
        assert (second["status"], second["version"]) == ("success", 2)
        assert list(grafana.dashboards) == ["pagedserve"]
        assert [f["title"] for f in grafana.folders] == ["LLM serving"]  # found, not made twice
        stored = grafana.dashboards["pagedserve"]
        assert stored["folderUid"] == grafana.folders[0]["uid"]
        assert stored["dashboard"]["panels"] == dashboard()["panels"]


def test_push_errors_are_clear(capsys):
    with GrafanaStandIn(token="good") as grafana:
        with pytest.raises(GrafanaPushError, match="rejected the token"):
            push_dashboard(grafana.url, "wrong")
        assert grafana.dashboards == {}
        assert main(["grafana", "--url", grafana.url, "--token", "wrong"]) == 1
        assert "rejected the token" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(GrafanaPushError, match="cannot reach Grafana"):
        push_dashboard(closed, "good")
    with pytest.raises(GrafanaPushError, match="must start with http"):
        push_dashboard("grafana:3000", "good")
    assert main(["grafana"]) == 2
    assert "--out FILE" in capsys.readouterr().err
