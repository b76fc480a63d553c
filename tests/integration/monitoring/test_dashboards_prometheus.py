"""Every query of the Grafana dashboards evaluates on the test bed's real Prometheus.

Grafana's own variables are replaced the way Grafana would (a rate interval, a range,
a tenant); Prometheus answers 400 ``bad_data`` to a query that does not parse or does
not type-check, so each panel passing here is a query Grafana can run. The metrics do
not exist until issue 14's stage 2 wires them, so the answers are empty for now.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

DASHBOARDS = Path(__file__).resolve().parents[3] / "manifests" / "monitoring" / "dashboards"
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "$tenant": "acme",
    "$agent": ".*",
    "$currency": "USD",
}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$")


def substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable is left in {expr!r}"
    return expr


def queries() -> list[tuple[str, str]]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{board['uid']}: {panel['title']}", target["expr"]))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                match = _LABEL_VALUES.match(variable["query"]["query"])
                assert match, variable["query"]["query"]
                found.append((f"{board['uid']}: variable {variable['name']}", match.group(1)))
    return found


def evaluate(prometheus_url: str, expr: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(
        f"{prometheus_url}/api/v1/query", params={"query": substitute(expr)}, timeout=30
    )
    return response.status_code, response.json()


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[q[0] for q in queries()])
def test_the_query_evaluates_on_prometheus(
    prometheus: dict[str, str], where: str, expr: str
) -> None:
    status, body = evaluate(prometheus["prometheus"], expr)
    assert (status, body.get("status")) == (200, "success"), f"{where}: {body.get('error')}"


@pytest.mark.parametrize(
    "broken",
    [
        "sum(rate(bmad_ledger_records_total[$__rate_interval])",
        "histogram_quantile(0.95, bmad_agent_inflight",
        'sum by (tenant) (bmad_tenant_usage_cost{period="this")',
        "rate(bmad_agent_inflight)",
    ],
)
def test_a_broken_query_is_refused_so_the_check_can_fail(
    prometheus: dict[str, str], broken: str
) -> None:
    status, body = evaluate(prometheus["prometheus"], broken)
    assert (status, body.get("errorType")) == (400, "bad_data"), urllib.parse.quote(broken)
