"""The Grafana dashboard model (JSON) built from `grafana_panels.PANELS`.

One row per `grafana_panels.ROWS` entry, three time-series panels a line, each query on the
Prometheus data source the user picks in the `datasource` variable. The same JSON is committed
as `ray_configs/grafana/pagedserve.json` for import by hand (a test keeps the two equal).
"""

from __future__ import annotations

import json
import re

from pagedserve.cluster.grafana_panels import PANELS, ROWS, Panel
from pagedserve.metric_list import BY_NAME, FEATURES

DASHBOARD_UID = "pagedserve"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_W, PANEL_H, PER_LINE = 8, 8, 3
_SERIES = re.compile(r"ray_(pagedserve_[a-z0-9_]+)")


def panel_metrics(panel: Panel) -> set[str]:
    """The list's metric names one panel's queries read."""
    names = set()
    for target in panel.targets:
        for series in _SERIES.findall(target.expr):
            for suffix in ("_total", "_bucket", "_sum", "_count", ""):
                if series.endswith(suffix) and series.removesuffix(suffix) in BY_NAME:
                    names.add(series.removesuffix(suffix))
                    break
    return names


def dashboard() -> dict:
    """The dashboard model: rows of panels and the `datasource` template variable."""
    panels, y, next_id = [], 0, 1
    for row in ROWS:
        panels.append({"type": "row", "title": row, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        in_row = [p for p in PANELS if p.row == row]
        for i, panel in enumerate(in_row):
            x = (i % PER_LINE) * PANEL_W
            panels.append(_panel(panel, next_id, x, y + (i // PER_LINE) * PANEL_H))
            next_id += 1
        y += -(-len(in_row) // PER_LINE) * PANEL_H
    return {
        "uid": DASHBOARD_UID, "title": "pagedserve", "tags": ["pagedserve", "ray-serve"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "description": "pagedserve on Ray Serve: traffic, latency, engine, KV and caches, "
                       "replicas and scaling (generated from pagedserve.metric_list)",
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "options": [], "includeAll": False, "multi": False}]},
        "annotations": {"list": []},
        "panels": panels,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    needs = sorted({BY_NAME[n].needs for n in panel_metrics(panel)} - {None})
    description = "; ".join([panel.description] * bool(panel.description) + [
        f"has data once {FEATURES[feature]} is configured" for feature in needs])
    return {
        "type": "timeseries", "title": panel.title, "id": panel_id, "description": description,
        "datasource": DATASOURCE, "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend, "range": True}
                    for i, t in enumerate(panel.targets)],
    }


def dashboard_json() -> str:
    """The dashboard as the committed file holds it (stable key order, trailing newline)."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"
