"""The usage ledger wired in, end to end on the test bed: the operator (its own process,
metering on), the platform Redis and PostgreSQL, and `bmad runtime` processes (echo
provider) started from the Agents' Deployments by `ReplicaMirror`.

A Tenant with ``tokensPerMonth: 1000`` and two Agents: they answer until the ledger
passes 1,000 tokens, then refuse with 429 ``budget_exhausted`` and the reset time; the
Tenant and both Agents get ``BudgetExhausted=True`` and the Tenant an Event; the
statuses show exactly the tokens answered; raising the limit lets them answer again.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from bmad_crds import runtime_contract as contract
from bmad_integrations import taskbus
from bmad_integrations.usage import periods
from bmad_operator import kube
from bmad_testbed.kubectl import Kubectl
from bmad_testbed.runtimes import ReplicaMirror

from .helpers import (
    Tenants,
    agent,
    bind_redis,
    condition,
    env_of,
    serving_ports,
    tenant,
    until,
    wait_tenant,
)

pytestmark = [pytest.mark.integration]

Obj = dict[str, Any]

LIMIT = 1000
# About 100 tokens in and 100 out per call with the echo provider.
PROMPT = "Count the boxes on the architecture diagram and name each one. " * 6


async def invoke(http: httpx.AsyncClient, port: int) -> httpx.Response:
    return await http.post(f"http://127.0.0.1:{port}/v1/invoke", json={"input": PROMPT})


@pytest.mark.usefixtures("metering_operator")
async def test_a_tenant_is_refused_past_its_token_budget_and_resumes_when_it_is_raised(
    *,
    kubectl: Kubectl,
    tenants: Tenants,
    api: kube.Kube,
    ledger_dsn: str,
    testbed_env: dict[str, str],
    tmp_path: Path,
) -> None:
    name = tenants.name("budget")
    namespace = f"{name}-work"
    tenants.apply(tenant(name, [namespace], limits={"tokensPerMonth": LIMIT}))
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(namespace)
    # dev also takes tasks from its bus: the test bed's Redis, bound as an Integration.
    bind_redis(k, testbed_env)
    agents = ("dev", "qa")
    k.apply(agent("dev", integrations=["redis"]))
    k.apply(agent("qa"))

    # The operator renders the ledger into each pod: the URL without credentials, the
    # password from a Secret it made.
    async def configured() -> bool:
        for agent_name in agents:
            env = env_of(await api.get("Deployment", namespace, agent_name))
            url = env.get(contract.USAGE_LEDGER_URL, {}).get("value", "")
            if not url or "@" in url or contract.USAGE_LEDGER_PASSWORD not in env:
                return False
            if await api.get("Secret", namespace, contract.usage_secret_name(agent_name)) is None:
                return False
        return True

    await until(configured, within=60, what="the agents' Deployments carry the ledger")

    workdirs = [tmp_path / agent_name for agent_name in agents]
    for workdir in workdirs:
        workdir.mkdir()
    mirrors = [
        ReplicaMirror(api, namespace, agent_name, workdir=workdir, targets_dir=workdir)
        for agent_name, workdir in zip(agents, workdirs, strict=True)
    ]
    async with mirrors[0], mirrors[1], httpx.AsyncClient(timeout=30) as http:
        ports = await until(
            lambda: serving_ports(http, mirrors), within=90, what="both runtimes ready", every=1
        )

        # Answers until the ledger passes the budget, then the refusal.
        answered = {agent_name: [0, 0] for agent_name in agents}  # tokens in, out
        calls = 0
        refusal: httpx.Response | None = None

        async def call(index: int) -> httpx.Response:
            """One invocation of agent ``index``; its tokens counted when answered."""
            nonlocal calls
            response = await invoke(http, ports[index])
            calls += 1
            assert response.status_code in {200, 429}, response.text
            if response.status_code == 200:
                usage = response.json()["usage"]
                answered[agents[index]][0] += usage["tokensIn"]
                answered[agents[index]][1] += usage["tokensOut"]
            return response

        async def next_call() -> bool:
            nonlocal refusal
            response = await call(calls % len(agents))
            if response.status_code == 429:
                refusal = response
                return True
            return False

        await until(next_call, within=120, what="a refusal past the budget", every=0.2)
        spent = sum(sum(v) for v in answered.values())
        assert spent >= LIMIT, f"refused after {spent} tokens, before the budget of {LIMIT}"
        print(f"first refusal after {calls - 1} answers, {spent} tokens")
        assert refusal is not None
        error = refusal.json()["error"]
        assert error["code"] == "budget_exhausted"
        next_month = periods.containing(dt.datetime.now(dt.UTC)).end
        assert dt.datetime.fromisoformat(error["resetsAt"]) == next_month
        assert int(refusal.headers["Retry-After"]) >= 1

        # Both agents refuse (the budget is the tenant's), each within its short cache.
        async def both_refuse() -> bool:
            codes = [(await call(i)).status_code for i in range(len(agents))]
            return codes == [429, 429]

        await until(both_refuse, within=90, what="both agents refuse", every=0.5)
        spent = sum(sum(v) for v in answered.values())

        # A task is refused too: failed at its first attempt, with the code.
        producer = taskbus.TaskProducer.from_url(
            testbed_env["BMAD_REDIS_URL"],
            tenant=name,
            agent=contract.agent_key(name="dev", namespace=namespace, tenant=name),
        )
        try:
            await producer.submit("over-budget-1", {"input": PROMPT})
            result = await producer.wait_result("over-budget-1", timeout_s=60)
        finally:
            await producer.aclose()
        assert result.status == "failed", result
        assert (result.error or "").startswith("budget_exhausted:"), result.error
        assert result.attempt == 1

        # The ledger holds exactly what was answered, one row per answer (once the
        # ingester has taken the last records off the streams).
        async def ledger_rows() -> list[asyncpg.Record] | None:
            conn = await asyncpg.connect(ledger_dsn)
            try:
                rows = await conn.fetch(
                    "SELECT agent, count(*) AS n, sum(tokens_in) AS tin, "
                    "sum(tokens_out) AS tout, count(DISTINCT record_id) AS ids, "
                    "min(tenant) AS t1, max(tenant) AS t2 "
                    "FROM usage_ledger WHERE namespace = $1 GROUP BY agent",
                    namespace,
                )
            finally:
                await conn.close()
            ledgered = {r["agent"]: [r["tin"], r["tout"]] for r in rows}
            return rows if ledgered == answered else None

        rows = await until(ledger_rows, within=60, what="the ledger holds every answer")
        by_agent = {r["agent"]: r for r in rows}
        assert sum(r["n"] for r in rows) == sum(r["ids"] for r in rows)
        for agent_name in agents:
            row = by_agent[agent_name]
            assert [row["tin"], row["tout"]] == answered[agent_name]
            assert row["t1"] == row["t2"] == name

        # Tenant and Agents: BudgetExhausted=True, usage in status as the ledger has it.
        async def tenant_exhausted() -> Obj | None:
            body = await api.get("Tenant", None, name)
            cond = condition(body or {}, "BudgetExhausted")
            usage = ((body or {}).get("status") or {}).get("usage") or {}
            if cond and cond["status"] == "True" and usage.get("tokensThisPeriod") == spent:
                return body
            return None

        body = await until(tenant_exhausted, within=60, what="Tenant BudgetExhausted=True")
        cond = condition(body, "BudgetExhausted")
        assert cond is not None
        assert cond["reason"] == "TokensPerMonthReached"
        usage = body["status"]["usage"]
        assert usage["thisPeriod"]["tokensIn"] == sum(v[0] for v in answered.values())
        assert usage["thisPeriod"]["tokensOut"] == sum(v[1] for v in answered.values())
        this_month = periods.containing(dt.datetime.now(dt.UTC)).start
        assert usage["periodStart"] == this_month.strftime("%Y-%m-%dT%H:%M:%SZ")
        for agent_name in agents:

            async def agent_exhausted(agent_name: str = agent_name) -> Obj | None:
                found = await api.get("Agent", namespace, agent_name)
                cond = condition(found or {}, "BudgetExhausted")
                shown = (((found or {}).get("status") or {}).get("usage") or {}).get(
                    "thisPeriod"
                ) or {}
                wanted = answered[agent_name]
                if (
                    cond
                    and cond["status"] == "True"
                    and [
                        shown.get("tokensIn"),
                        shown.get("tokensOut"),
                    ]
                    == wanted
                ):
                    return found
                return None

            await until(agent_exhausted, within=60, what=f"Agent {agent_name} exhausted")
        events = kubectl.json(
            "get", "events", "-A", "--field-selector",
            f"involvedObject.kind=Tenant,involvedObject.name={name}",
        )["items"]  # fmt: skip
        assert any(e["reason"] == "BudgetExhausted" for e in events), json.dumps(
            [(e["reason"], e["message"]) for e in events]
        )

        # Raising the limit lets both agents answer again.
        kubectl.run(
            "patch", "tenant", name, "--type=merge", "-p",
            json.dumps({"spec": {"limits": {"tokensPerMonth": 1_000_000}}}),
        )  # fmt: skip

        async def answering_again() -> bool:
            codes = [(await invoke(http, port)).status_code for port in ports]
            assert set(codes) <= {200, 429}, codes
            return codes == [200, 200]

        await until(answering_again, within=60, what="answers after the raise", every=1)
        wait_tenant(kubectl, name, "BudgetExhausted", "False")
