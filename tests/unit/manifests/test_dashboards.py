"""The Grafana dashboards in manifests/monitoring/dashboards: ConfigMaps the sidecar
loads, well-formed panels, and only metric names that docs/billing.md documents."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from .test_manifests import MANIFESTS, REPO, kustomize

pytestmark = pytest.mark.unit

DASHBOARDS = MANIFESTS / "monitoring" / "dashboards"
DOC = REPO / "docs" / "billing.md"
_GROUPING = re.compile(r"\b(by|without)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_OURS = re.compile(r"\b((?:bmad|gen_ai)_[a-z0-9_]+)\b")
_HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def boards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def metric_names(expr: str) -> set[str]:
    """The metrics a query reads (label names and grouping left out)."""
    bare = _MATCHERS.sub("", _GROUPING.sub("", expr))
    return {_HISTOGRAM_SERIES.sub("", name) for name in _OURS.findall(bare)}


def documented() -> set[str]:
    """Metric names in the tables of docs/billing.md's Metrics section."""
    text = DOC.read_text()
    section = text[text.index("## Metrics") : text.index("## Dashboards")]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, re.MULTILINE))


def test_the_three_dashboards_are_configmaps_with_the_sidecar_label() -> None:
    objs = kustomize(DASHBOARDS)
    assert sorted(o["metadata"]["name"] for o in objs) == [
        "bmad-dashboard-cost",
        "bmad-dashboard-operator",
        "bmad-dashboard-tenant",
    ]
    for obj in objs:
        assert obj["kind"] == "ConfigMap"
        assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = obj["data"].items()
        assert json.loads(text) == json.loads((DASHBOARDS / key).read_text())


def test_every_panel_queries_prometheus_through_the_datasource_variable() -> None:
    uids = set()
    for name, board in boards().items():
        assert board["uid"] not in uids, name
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in panels(board):
            where = f"{name}: {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["description"], where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["datasource"] == panel["datasource"], where
            grid = panel["gridPos"]
            assert grid["x"] >= 0, where
            assert grid["x"] + grid["w"] <= 24, where


def test_dashboards_use_only_documented_metric_names() -> None:
    names = documented()
    assert "gen_ai_client_token_usage" in names  # the section parses
    used: set[str] = set()
    for board in boards().values():
        for panel in panels(board):
            for target in panel["targets"]:
                used |= metric_names(target["expr"])
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                used |= metric_names(variable["query"]["query"])
    assert used, "no metric found in the dashboards"
    assert used <= names, f"not in docs/billing.md: {sorted(used - names)}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum{tenant="a"}[5m]))',
            {"gen_ai_client_token_usage"},
        ),
        ("sum(bmad_ledger_backlog_entries)", {"bmad_ledger_backlog_entries"}),
        ("histogram_quantile(0.9, sum by (le) (rate(bmad_x_bucket[1m])))", {"bmad_x"}),
    ],
)
def test_metric_names_are_read_from_queries(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_dashboard_file_is_in_the_kustomization() -> None:
    listed = (DASHBOARDS / "kustomization.yaml").read_text()
    files = sorted(DASHBOARDS.glob("*.json"))
    assert [p.name for p in files] == ["bmad-cost.json", "bmad-operator.json", "bmad-tenant.json"]
    for path in files:
        assert path.name in listed
