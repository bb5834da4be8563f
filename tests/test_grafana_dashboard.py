"""The Grafana dashboard (dashboards/grafana/cmx-overview.json) without servers: well-formed panels
on the `${datasource}` variable, and every metric its queries name is one the project exports
(tests/test_prometheus.py runs the queries against a real Prometheus)."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from cloudmatrix.launcher import prometheus
from cloudmatrix.launcher.processes import ProcessRecord

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "grafana" / "cmx-overview.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _graphs(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exported_names() -> set[str]:
    """Every ``cmx_`` metric name the sources under services/ and libs/cloudmatrix/ can produce: a
    string literal, or an f-string ``f"cmx_..{name}"`` joined with a string literal of its file."""
    names: set[str] = set()
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "libs" / "cloudmatrix").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        names |= {s for s in literals if s.startswith("cmx_")}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and len(node.values) == 2 and _is_cmx_prefix(node.values):
                names |= {node.values[0].value + s for s in literals if s.isidentifier()}
    return names


def _is_cmx_prefix(values: list[ast.expr]) -> bool:
    head, tail = values
    return (isinstance(head, ast.Constant) and head.value.startswith("cmx_")
            and isinstance(tail, ast.FormattedValue))


def _target_labels() -> set[str]:
    """The labels `cmx up`'s scrape config adds (cmx_process, ...): label names, not metrics."""
    record = ProcessRecord("p", "s", 1, "log", "ready", metrics_port=1)
    return set(prometheus.targets([record], "t")[0]["labels"])


def test_the_dashboard_is_a_grafana_dashboard_with_datasource_and_model_variables(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model_name"]
    assert model["datasource"] == DATASOURCE and model["definition"].startswith("label_values(")
    assert model["includeAll"] and model["allValue"] == ".*"


def test_every_panel_has_a_title_the_datasource_variable_a_unit_and_queries(dashboard):
    for panel in _graphs(dashboard):
        assert panel["title"] and panel["type"] == "timeseries", panel.get("title")
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == DATASOURCE, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_panel_ids_are_unique_and_every_panel_is_placed_on_the_grid_without_overlap(dashboard):
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_metric_a_query_names_is_exported_by_the_project(dashboard):
    exported, labels = _exported_names(), _target_labels()
    assert {"cmx_kvcache_hits", "cmx_die_forwards", "cmx_fabric_bytes"} <= exported  # the scan sees f-strings
    named = {name for panel in _graphs(dashboard) for t in panel["targets"]
             for name in re.findall(r"\bcmx_[a-z0-9_]+", t["expr"])} - labels
    assert len(named) >= 15
    unknown = sorted(name for name in named
                     if not ({name} | {name.removesuffix(s) for s in SUFFIXES}) & exported)
    assert not unknown, f"not exported by services/ or libs/cloudmatrix/: {unknown}"
