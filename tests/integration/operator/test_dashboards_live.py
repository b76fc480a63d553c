"""Every Grafana panel returns data from real processes, scraped by the test bed's real
Prometheus: the operator (its own process, metering on, a price table that prices the
echo model) and two `bmad runtime` processes (echo provider) that the operator's Agent
Deployments describe, started by `ReplicaMirror`, which lists them in Prometheus's
file_sd targets. The operator's metrics port is listed there too.

After some model calls (whole and streamed), every query of every dashboard must
evaluate, and every panel must return at least one series, except those in
`MAY_BE_EMPTY`, whose metrics only appear when something goes wrong or happens
that this scene does not make happen. A query with a misspelt metric returns nothing
and fails the test (`test_a_misspelt_metric_returns_nothing_and_would_fail`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bmad_crds import runtime_contract as contract
from bmad_operator import kube
from bmad_testbed import dashboards
from bmad_testbed.kubectl import Kubectl
from bmad_testbed.operator_proc import OperatorProcess
from bmad_testbed.runtimes import ReplicaMirror

from .helpers import Tenants, agent, env_of, serving_ports, tenant, until, wait_tenant

pytestmark = [pytest.mark.integration]

Obj = dict[str, Any]

# Panels (dashboard uid, title) that may have no series in this scene, and why.
MAY_BE_EMPTY = {
    # A fresh ledger has no usage in the previous month, so no cost for it.
    ("bmad-cost", "Spend last period"),
    # No reconcile fails here.
    ("bmad-operator", "Reconcile errors"),
    # Every row is put in a batch within a second (this tenant is not billed, so its
    # rows go to unbilled batches): the gauge is empty while nothing waits.
    ("bmad-operator", "Records not yet reported"),
    # No Stripe webhook is delivered here.
    ("bmad-operator", "Webhook events"),
    # The echo model does not fail.
    ("bmad-tenant", "Model call errors"),
    # The ledger is up: no record fails to be written.
    ("bmad-tenant", "Usage records not written"),
}
# echo's tokens priced, so that the cost panels have something to show.
PRICES = """\
currency: USD
prices:
  - provider: echo
    model: "*"
    inputPer1M: "1000"
    outputPer1M: "2000"
"""
PROMPT = "Draft the acceptance criteria for the login story, one line each. " * 3
CALLS_PER_AGENT = 6
AGENTS = ("dev", "qa")


@pytest.fixture
def priced_operator(
    start_ledger_operator: Callable[..., OperatorProcess],
    testbed_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    """The operator with the ledger and a price table, scraped by Prometheus."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES)
    proc = start_ledger_operator(BMAD_OPERATOR_PRICES_FILE=str(prices))
    target = Path(testbed_env["BMAD_PROMETHEUS_TARGETS_DIR"]) / f"operator-{tmp_path.name}.json"
    target.write_text(
        json.dumps(
            [{"targets": [f"127.0.0.1:{proc.metrics_port}"], "labels": {"job": "bmad-operator"}}]
        )
    )
    try:
        yield proc
    finally:
        target.unlink(missing_ok=True)


async def evaluate(http: httpx.AsyncClient, url: str, expr: str, variables: Obj) -> Obj:
    response = await http.get(
        f"{url}/api/v1/query", params={"query": dashboards.substitute(expr, variables)}
    )
    body: Obj = response.json()
    assert (response.status_code, body.get("status")) == (200, "success"), (
        f"{expr}: {body.get('error')}"
    )
    return body


async def empty_panels(
    http: httpx.AsyncClient, url: str, variables: Obj
) -> dict[str, dashboards.Query]:
    """The queries (panels and variables) that evaluate to no series now."""
    empty = {}
    for query in dashboards.queries():
        body = await evaluate(http, url, query.expr, variables)
        if not body["data"]["result"]:
            empty[query.where] = query
    return empty


async def test_every_panel_returns_data_from_the_runtimes_and_the_operator(
    *,
    priced_operator: OperatorProcess,
    kubectl: Kubectl,
    tenants: Tenants,
    api: kube.Kube,
    prometheus: dict[str, str],
    testbed_env: dict[str, str],
    tmp_path: Path,
) -> None:
    name = tenants.name("dashboards")
    namespace = f"{name}-work"
    tenants.apply(tenant(name, [namespace], limits={"tokensPerMonth": 10_000_000}))
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(namespace)
    for agent_name in AGENTS:
        k.apply(agent(agent_name))

    async def configured() -> bool:
        for agent_name in AGENTS:
            env = env_of(await api.get("Deployment", namespace, agent_name))
            if contract.USAGE_LEDGER_PASSWORD not in env:
                return False
            if await api.get("Secret", namespace, contract.usage_secret_name(agent_name)) is None:
                return False
        return True

    await until(configured, within=60, what="the agents' Deployments carry the ledger")

    targets = Path(testbed_env["BMAD_PROMETHEUS_TARGETS_DIR"])
    mirrors = []
    for agent_name in AGENTS:
        workdir = tmp_path / agent_name
        workdir.mkdir()
        mirrors.append(
            ReplicaMirror(api, namespace, agent_name, workdir=workdir, targets_dir=targets)
        )
    url = prometheus["prometheus"]
    variables = {"$tenant": name, "$agent": ".*", "$currency": "USD"}
    async with mirrors[0], mirrors[1], httpx.AsyncClient(timeout=30) as http:
        ports = await until(
            lambda: serving_ports(http, mirrors), within=120, what="both runtimes ready", every=1
        )
        for port in ports:
            for n in range(CALLS_PER_AGENT):
                body = {"input": PROMPT, "stream": n == 0}
                answer = await http.post(f"http://127.0.0.1:{port}/v1/invoke", json=body)
                assert answer.status_code == 200, answer.text

        async def all_have_data() -> bool:
            empty = await empty_panels(http, url, variables)
            return not {
                where for where, q in empty.items() if (q.board, q.title) not in MAY_BE_EMPTY
            }

        try:
            await until(all_have_data, within=180, what="every panel has data", every=3)
        except AssertionError:
            empty = await empty_panels(http, url, variables)
            missing = sorted(w for w, q in empty.items() if (q.board, q.title) not in MAY_BE_EMPTY)
            logs = "\n".join(m.logs() for m in mirrors)
            raise AssertionError(
                f"panels without data: {missing}\n{priced_operator.log_text()[-3000:]}\n{logs}"
            ) from None

        # The numbers are this scene's: the ledger's tokens of this tenant come to the
        # runtimes' token histograms (both count every answered call once), and each
        # call was timed once.
        async def scalar(expr: str) -> float | None:
            result = (await evaluate(http, url, expr, variables))["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        async def ledger_caught_up() -> tuple[float, float] | None:
            ledger = await scalar('sum(bmad_tenant_usage_tokens{tenant="$tenant", period="this"})')
            runtime = await scalar('sum(gen_ai_client_token_usage_sum{tenant="$tenant"})')
            return (ledger, runtime) if ledger and ledger == runtime else None

        await until(ledger_caught_up, within=60, what="ledger tokens = runtime tokens", every=2)
        calls = await scalar(
            'sum(gen_ai_client_operation_duration_seconds_count{tenant="$tenant", error_type=""})'
        )
        assert calls == CALLS_PER_AGENT * len(AGENTS)
        # Every panel's query evaluated (`evaluate` asserts it), listed once more for the
        # record: none is left out of the check.
        assert len(dashboards.queries()) >= 35


async def test_a_misspelt_metric_returns_nothing_and_would_fail(
    prometheus: dict[str, str],
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        body = await evaluate(
            http,
            prometheus["prometheus"],
            'sum(rate(gen_ai_client_token_usge_sum{tenant="$tenant"}[$__rate_interval]))',
            {"$tenant": "anyone"},
        )
    assert body["data"]["result"] == []
