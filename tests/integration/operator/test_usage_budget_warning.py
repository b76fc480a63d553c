"""The soft budget warning, end to end: the operator (its own process, metering on, the
price table of manifests/manager mounted as a file), the platform Redis and PostgreSQL,
the test bed's SMTP server, and usage records appended to an agent's ledger stream the
way the runtime appends them.

A Tenant with ``tokensPerMonth: 1000`` and ``warnAtPercent: 50`` whose ``spec.notify``
names an smtp Integration: below 500 tokens nothing is said (``BudgetWarning=False``);
once the ledger passes 500 the Tenant has ``BudgetWarning=True``, one ``BudgetWarning``
Event and one e-mail in the SMTP server's Maildir; more usage in the same month gives
neither a second Event nor a second e-mail. The usage (model gpt-4o) is costed with the
shipped price table: ``status.usage.thisPeriod.cost`` in USD. A Tenant with a cost budget
(``costPerMonth``) is exhausted by that priced usage, and restored when it is raised.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import mailbox
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import asyncio as aioredis

from bmad_integrations.usage import budget, periods, record
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import Tenants, condition, tenant, until, wait_tenant

pytestmark = [pytest.mark.integration]

LIMIT = 1000
PERCENT = 50
PRICES = Path(__file__).resolve().parents[3] / "manifests" / "manager" / "prices.yaml"


@pytest.fixture
def priced_operator(
    start_ledger_operator: Callable[..., OperatorProcess], tmp_path: Path
) -> OperatorProcess:
    """The operator with the usage ledger and the shipped price table (the ConfigMap's
    prices.yaml, as the Deployment mounts it)."""
    configmap = yaml.safe_load(PRICES.read_text())
    prices_file = tmp_path / "prices" / "prices.yaml"
    prices_file.parent.mkdir()
    prices_file.write_text(configmap["data"]["prices.yaml"])
    return start_ledger_operator(BMAD_OPERATOR_PRICES_FILE=str(prices_file))


def mails_to(maildir: Path, recipient: str) -> list[Any]:
    box = mailbox.Maildir(str(maildir), create=False)
    return [m for _, m in box.items() if recipient in str(m.get("To", ""))]


def tenant_events(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json(
        "get", "events", "--all-namespaces", "--field-selector",
        f"involvedObject.kind=Tenant,involvedObject.name={name}",
    )["items"]  # fmt: skip
    return items


@pytest.mark.usefixtures("priced_operator")
async def test_a_tenant_is_warned_once_by_event_and_email_at_its_warning_level(
    kubectl: Kubectl, tenants: Tenants, testbed_env: dict[str, str]
) -> None:
    name = tenants.name("warn")
    namespace = f"{name}-work"
    recipient = f"{name}@example.com"
    tenants.apply(
        tenant(
            name,
            [namespace],
            limits={"tokensPerMonth": LIMIT, "warnAtPercent": PERCENT},
            notify={
                "integration": "mail",
                "integrationNamespace": namespace,
                "recipients": [recipient],
            },
        )
    )
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(namespace)
    k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "mail"},
            "spec": {
                "type": "email",
                "email": {
                    "provider": "smtp",
                    "host": testbed_env["BMAD_SMTP_HOST"],
                    "port": int(testbed_env["BMAD_SMTP_PORT"]),
                    "from": "bmad@example.com",
                },
            },
        }
    )
    k.run("wait", "--for=condition=Ready", "integration/mail", "--timeout=90s")
    maildir = Path(testbed_env["BMAD_SMTP_MAILDIR"])

    redis = aioredis.Redis.from_url(testbed_env["BMAD_REDIS_URL"], decode_responses=True)
    calls = 0

    async def use(tokens_in: int, tokens_out: int) -> None:
        """One model call of the agent ``dev``, appended as its runtime would."""
        nonlocal calls
        calls += 1
        entry = record.UsageRecord(
            record_id=f"http:{secrets.token_hex(8)}:0",
            tenant=name,
            namespace=namespace,
            agent="dev",
            provider="openai",
            model="gpt-4o",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            occurred_at=dt.datetime.now(dt.UTC),
            source="http",
        )
        await redis.xadd(record.stream_key(namespace, "dev"), record.encode(entry))  # type: ignore[arg-type]

    def shown(tokens: int) -> dict[str, Any] | None:
        """The Tenant once its status shows ``tokens`` (the pass that decided on them)."""
        obj = kubectl.json("get", "tenant", name)
        usage = (obj.get("status") or {}).get("usage") or {}
        return obj if usage.get("tokensThisPeriod") == tokens else None

    try:
        await use(200, 100)
        obj = eventually(lambda: shown(300), timeout=60, what="300 tokens in the status")
        cond = condition(obj, "BudgetWarning")
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("False", "BelowWarningLevel")
        assert "warnedForPeriod" not in obj["status"]["usage"]
        # 200 x 2.50 + 100 x 10.00 USD per 1M tokens
        assert obj["status"]["usage"]["thisPeriod"]["cost"] == {"USD": "0.0015"}

        await use(150, 100)  # 550 of 1000: past 50%
        obj = eventually(lambda: shown(550), timeout=60, what="550 tokens in the status")
        cond = condition(obj, "BudgetWarning")
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("True", "TokensPerMonthNearlyUsed")
        assert "550 of the tenant's 1000 tokens" in cond["message"]
        this_month = periods.containing(dt.datetime.now(dt.UTC)).start
        assert obj["status"]["usage"]["warnedForPeriod"] == this_month.strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        exhausted = condition(obj, "BudgetExhausted")
        assert exhausted is not None
        assert exhausted["status"] == "False"
        mails = eventually(
            lambda: mails_to(maildir, recipient), timeout=30, what="the warning e-mail"
        )
        assert len(mails) == 1
        mail = mails[0]
        assert mail["From"] == "bmad@example.com"
        assert name in mail["Subject"]
        assert "550 of the tenant's 1000 tokens" in mail.get_payload()
        warnings = [e for e in tenant_events(kubectl, name) if e["reason"] == "BudgetWarning"]
        assert len(warnings) == 1, warnings
        assert warnings[0]["type"] == "Warning"
        assert warnings[0].get("count", 1) == 1

        # More usage in the same month: no second Event, no second e-mail.
        await use(100, 100)
        obj = eventually(lambda: shown(750), timeout=60, what="750 tokens in the status")
        assert obj["status"]["usage"]["thisPeriod"]["cost"] == {"USD": "0.004125"}
        assert len(mails_to(maildir, recipient)) == 1
        events = tenant_events(kubectl, name)
        reasons = [e["reason"] for e in events]
        assert reasons.count("BudgetWarning") == 1, reasons
        assert [e.get("count", 1) for e in events if e["reason"] == "BudgetWarning"] == [1]
        assert "NotificationFailed" not in reasons
    finally:
        await redis.aclose()
    assert calls == 3


@pytest.mark.usefixtures("priced_operator")
async def test_a_cost_budget_is_exhausted_by_priced_usage_and_restored_when_raised(
    kubectl: Kubectl, tenants: Tenants, testbed_env: dict[str, str]
) -> None:
    """``costPerMonth: 0.002 USD`` and no token budget: gpt-4o usage priced by the shipped
    table (0.0015 USD) is within it; 0.00225 USD reaches it: ``BudgetExhausted=True``
    (``CostPerMonthReached``) and an Event, and the budget key the agents read says
    exhausted, with the cost; raising the amount restores it."""
    name = tenants.name("cost")
    namespace = f"{name}-work"
    tenants.apply(
        tenant(name, [namespace], limits={"costPerMonth": {"amount": "0.002", "currency": "USD"}})
    )
    wait_tenant(kubectl, name)
    redis = aioredis.Redis.from_url(testbed_env["BMAD_REDIS_URL"], decode_responses=True)

    async def use(tokens_in: int, tokens_out: int) -> None:
        entry = record.UsageRecord(
            record_id=f"http:{secrets.token_hex(8)}:0",
            tenant=name,
            namespace=namespace,
            agent="dev",
            provider="openai",
            model="gpt-4o",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            occurred_at=dt.datetime.now(dt.UTC),
            source="http",
        )
        await redis.xadd(record.stream_key(namespace, "dev"), record.encode(entry))  # type: ignore[arg-type]

    def budget_shows(status: str, reason: str) -> dict[str, Any] | None:
        obj = kubectl.json("get", "tenant", name)
        cond = condition(obj, "BudgetExhausted")
        return obj if cond and (cond["status"], cond["reason"]) == (status, reason) else None

    try:
        await use(200, 100)  # 0.0005 + 0.001 USD
        obj = eventually(
            lambda: budget_shows("False", "WithinBudget"), timeout=60, what="within the budget"
        )
        eventually(
            lambda: (
                (kubectl.json("get", "tenant", name).get("status") or {})
                .get("usage", {})
                .get("thisPeriod", {})
                .get("cost")
                == {"USD": "0.0015"}
            ),
            timeout=60,
            what="0.0015 USD in the status",
        )
        await use(100, 50)  # + 0.00025 + 0.0005 = 0.00225 USD
        obj = eventually(
            lambda: budget_shows("True", "CostPerMonthReached"),
            timeout=60,
            what="BudgetExhausted=True (CostPerMonthReached)",
        )
        message = condition(obj, "BudgetExhausted")["message"]  # type: ignore[index]
        assert message.startswith("0.00225 of the tenant's 0.002 USD this month are used")
        state = budget.decode(await redis.get(budget.key(name)))
        assert state is not None
        assert state.refuses(dt.datetime.now(dt.UTC))
        assert (state.cost_used, state.cost_limit, state.currency, state.limit) == (
            decimal.Decimal("0.00225"),
            decimal.Decimal("0.002"),
            "USD",
            None,
        )
        assert "cost budget is used up" in state.message()
        eventually(
            lambda: "BudgetExhausted" in [e["reason"] for e in tenant_events(kubectl, name)],
            timeout=30,
            what="a BudgetExhausted Event",
        )

        kubectl.run(
            "patch", "tenant", name, "--type=merge", "-p",
            json.dumps({"spec": {"limits": {"costPerMonth": {"amount": "1", "currency": "USD"}}}}),
        )  # fmt: skip
        eventually(
            lambda: budget_shows("False", "WithinBudget"),
            timeout=60,
            what="restored after the raise",
        )

        async def key_not_exhausted() -> bool:
            restored = budget.decode(await redis.get(budget.key(name)))
            return restored is not None and not restored.exhausted

        await until(key_not_exhausted, within=30, what="the budget key no longer exhausted")
    finally:
        await redis.aclose()
