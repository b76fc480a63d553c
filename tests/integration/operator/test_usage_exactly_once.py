"""1,000 model calls by three `bmad runtime` processes, one SIGKILLed mid-run: the ledger
holds exactly 1,000 records and Stripe (the stateful stand-in in front of stripe-mock)
received meter events summing to exactly their tokens, no identifier twice.

Everything runs as in production, on the test bed: the operator (its own process,
metering and reporting every second, to three meters: the two defaults and a third
named by ``BMAD_OPERATOR_STRIPE_METERS``) gives the Agent its ledger writer; `ReplicaMirror`
runs the Deployment's three replicas as `bmad runtime` processes that take tasks from
the agent's Redis stream and ask `GatedModel` (OpenAI-compatible, 3 tokens in and 2
out per call). After a quarter of the calls the gate closes, so every replica holds
calls in flight; one replica is killed with SIGKILL and started again in its "pod"
(its usage spool kept, as an emptyDir outlives a container), the gate opens, and the
replicas take over its tasks after ``BMAD_TASK_MIN_IDLE_MS`` (30 s) and run them again
under the same record ids.
"""

from __future__ import annotations

import base64
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from bmad_crds import runtime_contract as contract
from bmad_integrations import taskbus, taskwire
from bmad_operator import kube
from bmad_testbed import stripe_proxy
from bmad_testbed.kubectl import Kubectl
from bmad_testbed.runtimes import GatedModel, ReplicaMirror

from .conftest import StartOperator
from .helpers import (
    Tenants,
    agent,
    bind_redis,
    env_of,
    stripe_integration,
    tenant,
    until,
    wait_tenant,
)

pytestmark = [pytest.mark.integration]

TASKS = 1000
# The two default meters and a third the setting adds (in + out).
METERS = "bmad_input_tokens=tokens_in,bmad_output_tokens=tokens_out,bmad_tokens=tokens"
SYSTEM_NS = "bmad-system"


@pytest.fixture
def standin(kubectl: Kubectl, testbed_env: dict[str, str]) -> Iterator[stripe_proxy.StripeProxy]:
    """A stripe Integration in the operator's namespace, in front of the stand-in."""
    with (
        stripe_proxy.StripeProxy(testbed_env["BMAD_STRIPE_API_BASE"]) as proxy,
        stripe_integration(
            kubectl, SYSTEM_NS, proxy.url, prefix="stripe-meter", api_key=b"sk_test_metering"
        ) as name,
    ):
        proxy.integration = name  # type: ignore[attr-defined]
        yield proxy


@pytest.fixture
def model() -> Iterator[GatedModel]:
    """The agent's model, answering at once until a test closes its gate."""
    with GatedModel(api_key=f"sk-{uuid.uuid4().hex}") as gated:
        gated.gate.set()
        yield gated


async def test_1000_calls_by_3_runtimes_one_killed_are_1000_records_metered_once(
    *,
    start_ledger_operator: StartOperator,
    kubectl: Kubectl,
    tenants: Tenants,
    api: kube.Kube,
    standin: stripe_proxy.StripeProxy,
    model: GatedModel,
    ledger_dsn: str,
    testbed_env: dict[str, str],
    tmp_path: Path,
) -> None:
    start_ledger_operator(BMAD_OPERATOR_STRIPE_METERS=METERS)
    name = tenants.name("meter")
    namespace = f"{name}-work"
    integration = standin.integration  # type: ignore[attr-defined]
    tenants.apply(
        tenant(
            name,
            [namespace],
            billing={"integration": integration, "priceId": "price_basic"},
        )
    )
    body = wait_tenant(kubectl, name, timeout=90)
    customer = body["status"]["billing"]["customerId"]
    k = kubectl.in_namespace(namespace)
    bind_redis(k, testbed_env)
    k.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "llm-creds"},
            "data": {"apiKey": base64.b64encode(model.api_key.encode()).decode()},
        }
    )
    k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "llm"},
            "spec": {
                "type": "llm",
                "secretRef": {"name": "llm-creds"},
                "llm": {
                    "provider": "openai-compatible",
                    "baseUrl": model.url,
                    "defaultModel": model.model,
                },
            },
        }
    )
    k.apply(
        agent(
            "dev",
            replicas=3,
            integrations=["llm", "redis"],
            model={"provider": "openai-compatible", "name": model.model, "integration": "llm"},
        )
    )

    async def configured() -> bool:
        env = env_of(await api.get("Deployment", namespace, "dev"))
        return contract.USAGE_LEDGER_PASSWORD in env

    await until(configured, within=60, what="the Deployment carries the ledger")

    producer = taskbus.TaskProducer.from_url(
        testbed_env["BMAD_REDIS_URL"],
        tenant=name,
        agent=contract.agent_key(name="dev", namespace=namespace, tenant=name),
    )
    ids = [f"call-{i:04d}" for i in range(TASKS)]
    mirror = ReplicaMirror(api, namespace, "dev", workdir=tmp_path, targets_dir=tmp_path)
    try:
        async with mirror, httpx.AsyncClient(timeout=10) as http:

            async def three_ready() -> bool:
                if len(mirror.replicas) != 3:
                    return False
                for replica in mirror.replicas:
                    try:
                        ready = await http.get(f"http://127.0.0.1:{replica.port}/readyz")
                    except httpx.TransportError:
                        return False
                    if ready.status_code != 200:
                        return False
                return True

            await until(three_ready, within=90, what="three runtimes ready", every=1)

            async def finished(at_least: int) -> dict[str, taskwire.TaskResult] | None:
                done = await producer.results(ids)
                return done if len(done) >= at_least else None

            quarter = TASKS // 4
            for task_id in ids[:quarter]:
                await producer.submit(task_id, {"input": f"usage record {task_id}"})
            await until(lambda: finished(quarter // 2), within=120, what="calls answered")
            model.gate.clear()  # from here on every replica holds calls in flight
            for task_id in ids[quarter:]:
                await producer.submit(task_id, {"input": f"usage record {task_id}"})

            async def held() -> bool:
                return model.waiting >= 3

            await until(held, within=30, what="calls held at the model")
            victim = mirror.replicas[0].proc
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
            killed_at = len(await producer.results(ids))
            # As the kubelet does, the container starts again in its pod: on the same
            # spool, whose records of answers already given it ships.
            mirror.restart(victim.pid)
            model.gate.set()
            assert killed_at < TASKS, "the replica was killed after the run"
            results = await until(
                lambda: finished(TASKS), within=240, what="all tasks done", every=1
            )
    finally:
        await producer.aclose()

    assert {r.status for r in results.values()} == {"succeeded"}
    redelivered = sorted(t for t, r in results.items() if r.attempt > 1)
    assert redelivered, "no task of the killed replica was run again"
    tokens_in = sum(r.output["usage"]["tokensIn"] for r in results.values() if r.output)
    tokens_out = sum(r.output["usage"]["tokensOut"] for r in results.values() if r.output)

    async def ledger_totals() -> tuple[int, int, int, int] | None:
        conn = await asyncpg.connect(ledger_dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT record_id) AS ids, "
                "coalesce(sum(tokens_in), 0) AS tin, coalesce(sum(tokens_out), 0) AS tout "
                "FROM usage_ledger WHERE namespace = $1 AND agent = 'dev'",
                namespace,
            )
        finally:
            await conn.close()
        found = (int(row["n"]), int(row["ids"]), int(row["tin"]), int(row["tout"]))
        return found if found[0] >= TASKS else None

    count, distinct, ledger_in, ledger_out = await until(
        ledger_totals, within=60, what="the ledger holds every call"
    )
    assert (count, distinct) == (TASKS, TASKS)
    # The echo model answers a replay as it answered the first run: the same tokens.
    assert (ledger_in, ledger_out) == (tokens_in, tokens_out)

    async def metered() -> dict[tuple[str, str | None], int] | None:
        totals = standin.meter_totals()
        wanted = {
            ("bmad_input_tokens", customer): ledger_in,
            ("bmad_output_tokens", customer): ledger_out,
            ("bmad_tokens", customer): ledger_in + ledger_out,
        }
        return totals if all(totals.get(k) == v for k, v in wanted.items()) else None

    totals = await until(metered, within=90, what="Stripe metered the ledger", every=1)
    assert standin.duplicate_identifiers() == []
    assert set(totals) == {
        ("bmad_input_tokens", customer),
        ("bmad_output_tokens", customer),
        ("bmad_tokens", customer),
    }
    conn = await asyncpg.connect(ledger_dsn)
    try:
        unreported = await conn.fetchval(
            "SELECT count(*) FROM usage_ledger WHERE namespace = $1 AND batch_id IS NULL",
            namespace,
        )
        states = await conn.fetch(
            "SELECT state, count(*) AS n FROM meter_batches WHERE tenant = $1 GROUP BY state",
            name,
        )
    finally:
        await conn.close()
    assert unreported == 0
    assert {r["state"] for r in states} == {"reported"}
    print(  # the numbers for the report
        f"killed after {killed_at} results; {len(redelivered)} tasks run again; "
        f"{count} records, {ledger_in} + {ledger_out} tokens; "
        f"{len(standin.meter_events())} meter events"
    )
