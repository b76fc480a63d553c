"""Every query of the Grafana dashboards parses and type-checks on the test bed's real
Prometheus.

Grafana's own variables are replaced the way Grafana would (a rate interval, a range,
a tenant); Prometheus answers 400 ``bad_data`` to a query that does not parse or does
not type-check, so each panel passing here is a query Grafana can run. That the panels
also return data, from real runtime processes and the operator's metering, is
`tests/integration/operator/test_dashboards_live.py`.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import httpx
import pytest

from bmad_testbed import dashboards

pytestmark = pytest.mark.integration

VARIABLES = {"$tenant": "acme", "$agent": ".*", "$currency": "USD"}
QUERIES = dashboards.queries()


def evaluate(prometheus_url: str, expr: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(
        f"{prometheus_url}/api/v1/query",
        params={"query": dashboards.substitute(expr, VARIABLES)},
        timeout=30,
    )
    return response.status_code, response.json()


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_the_query_evaluates_on_prometheus(
    prometheus: dict[str, str], query: dashboards.Query
) -> None:
    status, body = evaluate(prometheus["prometheus"], query.expr)
    assert (status, body.get("status")) == (200, "success"), f"{query.where}: {body.get('error')}"


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
