"""The PromQL of the Grafana dashboards in manifests/monitoring/dashboards, as Grafana
would send it to Prometheus: every panel's targets and every query variable, with
Grafana's variables replaced (a rate interval, a range, a tenant, ...)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parents[2] / "manifests" / "monitoring" / "dashboards"
# What Grafana puts in for its own variables; a test adds the dashboards' (tenant, ...).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$")


@dataclass(frozen=True)
class Query:
    board: str  # the dashboard's uid
    title: str  # the panel's title, or "variable <name>"
    expr: str  # as written in the dashboard

    @property
    def where(self) -> str:
        return f"{self.board}: {self.title}"


def queries(folder: Path = DASHBOARDS) -> list[Query]:
    """Every panel target and query variable of every dashboard, in file order."""
    found = []
    for path in sorted(folder.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append(Query(board["uid"], panel["title"], target["expr"]))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                match = _LABEL_VALUES.match(variable["query"]["query"])
                if match is None:
                    raise ValueError(f"{path.name}: unexpected variable query {variable['query']}")
                found.append(Query(board["uid"], f"variable {variable['name']}", match.group(1)))
    return found


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's and the given variables (``{"$tenant": "acme"}``) put in;
    ValueError when one is left."""
    values = {**GRAFANA_VARIABLES, **variables}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    if "$" in expr:
        raise ValueError(f"a Grafana variable is left in {expr!r}")
    return expr
