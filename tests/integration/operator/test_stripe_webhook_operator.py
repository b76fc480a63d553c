"""The operator's Stripe webhook endpoint, end to end: the operator process (metering
on, its webhook inbox in a fresh database of the real PostgreSQL), the real API
server, and a billed Tenant whose customer comes from stripe-mock behind the stand-in.

A correctly signed ``invoice.payment_failed`` sets ``PaymentFailed=True`` and, once the
grace period (15 s here) has passed, suspends the tenant: its Agent is scaled to zero
while its spec keeps its replicas. A bad signature, a stale timestamp and a replayed
event id change nothing (400 / ``duplicate``; no inbox row, the status as it was). A
later ``invoice.paid`` resumes the tenant.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bmad_integrations import stripe_webhooks as wh
from bmad_testbed import procs
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess
from bmad_testbed.stripe_proxy import StripeProxy

from .helpers import Tenants, agent, condition, stripe_integration
from .helpers import tenant as _tenant

pytestmark = pytest.mark.integration

SYSTEM_NS = "bmad-system"
GRACE_SECONDS = 15
WEBHOOK_SECRET = "whsec_operator_endpoint_9c8b7a6d5e4f"


@pytest.fixture
def stripe_operator(
    start_ledger_operator: Callable[..., OperatorProcess], tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator with the ledger and the Stripe webhook endpoint on a free port."""
    port = procs.free_port()
    proc = start_ledger_operator(
        BMAD_OPERATOR_STRIPE_WEBHOOK_PORT=str(port),
        BMAD_OPERATOR_PAYMENT_GRACE_SECONDS=str(GRACE_SECONDS),
    )
    proc.stripe_webhook_port = port  # type: ignore[attr-defined]
    yield proc
    proc.stop()  # (stopping twice is harmless) the log is complete before it is read
    # Nothing secret reached the log.
    assert WEBHOOK_SECRET not in (tmp_path / "operator.log").read_text(errors="replace")


@pytest.fixture
def billing_integration(kubectl: Kubectl, testbed_env: dict[str, str]) -> Iterator[str]:
    """A stripe Integration in the operator's namespace whose Secret holds the API key
    and the webhook signing secret, in front of the Stripe stand-in."""
    with (
        StripeProxy(testbed_env["BMAD_STRIPE_API_BASE"]) as proxy,
        stripe_integration(
            kubectl,
            SYSTEM_NS,
            proxy.url,
            prefix="stripe-hook",
            api_key=b"sk_test_webhooks",
            more={"webhookSecret": WEBHOOK_SECRET.encode()},
        ) as name,
    ):
        yield name


def stripe_event(event_id: str, kind: str, customer: str, created: int) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "created": created,
            "data": {"object": {"object": "invoice", "customer": customer}},
        }
    ).encode()


def signed(
    payload: bytes, *, secret: str = WEBHOOK_SECRET, at: int | None = None
) -> dict[str, str]:
    stamp = int(time.time()) if at is None else at
    return {
        wh.SIGNATURE_HEADER: f"t={stamp},v1={wh.signature(payload, secret, stamp)}",
        "Content-Type": "application/json",
    }


async def inbox_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM stripe_webhook_events"))
    finally:
        await conn.close()


def payment_view(obj: dict[str, Any]) -> dict[str, Any]:
    """The parts of the Tenant's status the payment events may change."""
    return {
        kind: {k: (condition(obj, kind) or {}).get(k) for k in ("status", "reason")}
        for kind in ("PaymentFailed", "Suspended", "Ready", "BillingReady")
    }


def tenant_events(kubectl: Kubectl, name: str) -> list[str]:
    items = kubectl.json(
        "get",
        "events",
        "--all-namespaces",
        "--field-selector",
        f"involvedObject.kind=Tenant,involvedObject.name={name}",
    )["items"]
    return [item["reason"] for item in items]


async def test_operator_stripe_webhook_suspends_on_payment_failure_and_resumes_when_paid(
    kubectl: Kubectl,
    stripe_operator: OperatorProcess,
    tenants: Tenants,
    billing_integration: str,
    ledger_dsn: str,
) -> None:
    url = f"http://127.0.0.1:{stripe_operator.stripe_webhook_port}/stripe/webhook"  # type: ignore[attr-defined]
    name = tenants.name("payer")
    ns = f"{name}-ns"
    tenants.apply(
        _tenant(name, [ns], billing={"integration": billing_integration, "priceId": "price_basic"})
    )

    def billed() -> dict[str, Any] | None:
        obj = kubectl.json("get", "tenant", name)
        paid = condition(obj, "PaymentFailed")
        customer = ((obj.get("status") or {}).get("billing") or {}).get("customerId")
        return obj if customer and paid and paid["status"] == "False" else None

    obj = eventually(billed, timeout=90, what="the tenant billed, PaymentFailed=False")
    customer = obj["status"]["billing"]["customerId"]
    assert condition(obj, "PaymentFailed")["reason"] == "PaymentsCurrent"
    k = kubectl.in_namespace(ns)
    k.apply(agent("worker", replicas=1))
    eventually(
        lambda: (
            k.exists("deployment", "worker")
            and k.json("get", "deployment", "worker")["spec"]["replicas"] == 1
        ),
        timeout=60,
        what="the agent's deployment with one replica",
    )
    before = payment_view(kubectl.json("get", "tenant", name))

    now = int(time.time())
    failed = stripe_event(f"evt_fail_{name}", wh.PAYMENT_FAILED, customer, now)
    async with httpx.AsyncClient(timeout=10) as http:
        # Refused, and nothing recorded: a wrong secret, a stale timestamp, no header.
        bad = await http.post(url, content=failed, headers=signed(failed, secret="whsec_not_ours"))
        stale = await http.post(url, content=failed, headers=signed(failed, at=now - 3600))
        unsigned = await http.post(url, content=failed)
        assert [r.status_code for r in (bad, stale, unsigned)] == [400, 400, 400]
        assert [r.json()["error"]["code"] for r in (bad, stale, unsigned)] == [
            "bad_signature",
            "stale_signature",
            "bad_signature",
        ]
        assert WEBHOOK_SECRET not in bad.text + stale.text
        assert await inbox_rows(ledger_dsn) == 0
        assert payment_view(kubectl.json("get", "tenant", name)) == before

        # Signed: recorded once, PaymentFailed=True within the grace period.
        accepted = await http.post(url, content=failed, headers=signed(failed))
        assert accepted.status_code == 200, accepted.text
        assert accepted.json() == {"received": True, "duplicate": False, "id": f"evt_fail_{name}"}

        def warned() -> dict[str, Any] | None:
            o = kubectl.json("get", "tenant", name)
            c = condition(o, "PaymentFailed")
            return o if c and c["status"] == "True" else None

        obj = eventually(warned, timeout=GRACE_SECONDS, what="PaymentFailed=True")
        assert condition(obj, "PaymentFailed")["reason"] == "InvoicePaymentFailed"
        assert WEBHOOK_SECRET not in json.dumps(obj)

        # After the grace period: suspended, the agent scaled to zero, its spec kept.
        def suspended() -> dict[str, Any] | None:
            o = kubectl.json("get", "tenant", name)
            c = condition(o, "Suspended")
            return o if c and c["status"] == "True" else None

        obj = eventually(suspended, timeout=GRACE_SECONDS + 30, what="the tenant suspended")
        assert condition(obj, "Suspended")["reason"] == "PaymentOverdue"
        assert condition(obj, "PaymentFailed")["reason"] == "PaymentOverdue"
        assert condition(obj, "Ready")["reason"] == "PaymentOverdue"
        assert obj["spec"].get("suspended") is False  # the user's spec is never written
        eventually(
            lambda: (
                k.json("get", "deployment", "worker")["spec"]["replicas"] == 0
                and condition(k.json("get", "agent", "worker"), "Ready")["reason"]
                == "TenantSuspended"
            ),
            timeout=30,
            what="the agent scaled to zero by the payment suspension",
        )
        assert k.json("get", "agent", "worker")["spec"]["replicas"] == 1
        eventually(
            lambda: {"InvoicePaymentFailed", "PaymentOverdue"} <= set(tenant_events(kubectl, name)),
            timeout=30,
            what="an Event for PaymentFailed and one for the suspension",
        )

        # A replayed event id changes nothing, even carrying an invoice.paid.
        suspended_view = payment_view(kubectl.json("get", "tenant", name))
        replay = stripe_event(f"evt_fail_{name}", wh.PAID, customer, int(time.time()))
        again = await http.post(url, content=replay, headers=signed(replay))
        assert again.status_code == 200
        assert again.json()["duplicate"] is True
        assert await inbox_rows(ledger_dsn) == 1
        assert payment_view(kubectl.json("get", "tenant", name)) == suspended_view

        # invoice.paid resumes it.
        paid = stripe_event(f"evt_paid_{name}", wh.PAID, customer, int(time.time()) + 1)
        resumed_answer = await http.post(url, content=paid, headers=signed(paid))
        assert resumed_answer.status_code == 200
        assert resumed_answer.json()["duplicate"] is False

    def resumed() -> dict[str, Any] | None:
        o = kubectl.json("get", "tenant", name)
        c, s = condition(o, "PaymentFailed"), condition(o, "Suspended")
        return o if c and s and c["status"] == "False" and s["status"] == "False" else None

    obj = eventually(resumed, timeout=30, what="the tenant resumed after invoice.paid")
    assert condition(obj, "PaymentFailed")["reason"] == "PaymentsCurrent"
    eventually(
        lambda: k.json("get", "deployment", "worker")["spec"]["replicas"] == 1,
        timeout=30,
        what="the agent back at its replicas",
    )
    eventually(
        lambda: "PaymentResumed" in tenant_events(kubectl, name),
        timeout=30,
        what="a PaymentResumed Event",
    )
    assert await inbox_rows(ledger_dsn) == 2
    # The deliveries, counted by the operator's /metrics.
    async with httpx.AsyncClient(timeout=10) as http:
        scrape = (await http.get(f"http://127.0.0.1:{stripe_operator.metrics_port}/metrics")).text
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in scrape.splitlines()
        if line.startswith("bmad_stripe_webhook_events_total{")
    }
    assert counted == {
        'bmad_stripe_webhook_events_total{result="refused",type=""}': 3.0,
        'bmad_stripe_webhook_events_total{result="accepted",type="invoice.payment_failed"}': 1.0,
        'bmad_stripe_webhook_events_total{result="duplicate",type="invoice.paid"}': 1.0,
        'bmad_stripe_webhook_events_total{result="accepted",type="invoice.paid"}': 1.0,
    }


def subscription_event(
    event_id: str, kind: str, *, customer: str, subscription: str, status: str, created: int
) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "created": created,
            "data": {
                "object": {
                    "object": "subscription",
                    "id": subscription,
                    "customer": customer,
                    "status": status,
                }
            },
        }
    ).encode()


async def test_operator_stripe_webhook_subscription_updated_and_deleted_then_billing_removed(
    kubectl: Kubectl,
    stripe_operator: OperatorProcess,
    tenants: Tenants,
    billing_integration: str,
    ledger_dsn: str,
) -> None:
    """``customer.subscription.updated`` to ``unpaid``: ``BillingReady=False``
    (``SubscriptionUnpaid``), then after the grace period the tenant is suspended; updated
    to ``active``: billing ready and the agents back. ``customer.subscription.deleted``:
    ``BillingReady=False`` (``SubscriptionCanceled``), suspended after the grace period.
    A failed invoice on top, then ``spec.billing`` removed: ``PaymentFailed`` is cleared
    (``BillingRemoved``) and the suspension lifted."""
    url = f"http://127.0.0.1:{stripe_operator.stripe_webhook_port}/stripe/webhook"  # type: ignore[attr-defined]
    name = tenants.name("subs")
    ns = f"{name}-ns"
    tenants.apply(
        _tenant(name, [ns], billing={"integration": billing_integration, "priceId": "price_basic"})
    )

    def billed() -> dict[str, Any] | None:
        obj = kubectl.json("get", "tenant", name)
        paid = condition(obj, "PaymentFailed")
        sub = ((obj.get("status") or {}).get("billing") or {}).get("subscriptionId")
        return obj if sub and paid and paid["status"] == "False" else None

    obj = eventually(billed, timeout=90, what="the tenant billed, PaymentFailed=False")
    customer = obj["status"]["billing"]["customerId"]
    subscription = obj["status"]["billing"]["subscriptionId"]
    k = kubectl.in_namespace(ns)
    k.apply(agent("worker", replicas=1))

    def replicas() -> int | None:
        if not k.exists("deployment", "worker"):
            return None
        return int(k.json("get", "deployment", "worker")["spec"]["replicas"])

    eventually(lambda: replicas() == 1, timeout=60, what="the agent's deployment at 1")

    def shows(**wanted: tuple[str, str]) -> dict[str, Any] | None:
        """The Tenant once each named condition has the (status, reason) given."""
        o = kubectl.json("get", "tenant", name)
        for kind, (status, reason) in wanted.items():
            c = condition(o, kind)
            if c is None or (c["status"], c["reason"]) != (status, reason):
                return None
        return o

    now = int(time.time())
    async with httpx.AsyncClient(timeout=10) as http:

        async def deliver(payload: bytes) -> None:
            answer = await http.post(url, content=payload, headers=signed(payload))
            assert answer.status_code == 200, answer.text
            assert answer.json()["duplicate"] is False

        # Stripe gave up on the subscription: not billed, then suspended.
        await deliver(
            subscription_event(
                f"evt_sub_unpaid_{name}", wh.SUBSCRIPTION_UPDATED,
                customer=customer, subscription=subscription, status="unpaid", created=now,
            )
        )  # fmt: skip
        obj = eventually(
            lambda: shows(
                BillingReady=("False", "SubscriptionUnpaid"), Suspended=("False", "Active")
            ),
            timeout=GRACE_SECONDS,
            what="BillingReady=False (SubscriptionUnpaid) within the grace period",
        )
        assert subscription in condition(obj, "BillingReady")["message"]
        assert condition(obj, "Ready")["status"] == "False"
        eventually(
            lambda: shows(
                Suspended=("True", "SubscriptionUnpaid"), Ready=("False", "SubscriptionUnpaid")
            ),
            timeout=GRACE_SECONDS + 30,
            what="suspended once the grace period is over",
        )
        eventually(lambda: replicas() == 0, timeout=30, what="the agent scaled to zero")
        assert k.json("get", "agent", "worker")["spec"]["replicas"] == 1

        # Active again (a newer event): billed, and the agents back.
        await deliver(
            subscription_event(
                f"evt_sub_active_{name}", wh.SUBSCRIPTION_UPDATED,
                customer=customer, subscription=subscription, status="active", created=now + 1,
            )
        )  # fmt: skip
        eventually(
            lambda: shows(
                BillingReady=("True", "Subscribed"),
                Suspended=("False", "Active"),
                Ready=("True", "TenantReady"),
            ),
            timeout=30,
            what="billing ready and the tenant resumed",
        )
        eventually(lambda: replicas() == 1, timeout=30, what="the agent back at 1")
        resumed = [
            e["message"]
            for e in kubectl.json(
                "get", "events", "--all-namespaces", "--field-selector",
                f"involvedObject.kind=Tenant,involvedObject.name={name},reason=PaymentResumed",
            )["items"]
        ]  # fmt: skip
        assert resumed == ["The subscription is active again: the tenant's agents run again."]

        # Deleted in Stripe: cancelled, then suspended after the grace period.
        await deliver(
            subscription_event(
                f"evt_sub_deleted_{name}", wh.SUBSCRIPTION_DELETED,
                customer=customer, subscription=subscription, status="canceled", created=now + 2,
            )
        )  # fmt: skip
        eventually(
            lambda: shows(BillingReady=("False", "SubscriptionCanceled")),
            timeout=GRACE_SECONDS,
            what="BillingReady=False (SubscriptionCanceled)",
        )
        eventually(
            lambda: shows(Suspended=("True", "SubscriptionCanceled")),
            timeout=GRACE_SECONDS + 30,
            what="suspended after the cancellation's grace period",
        )
        eventually(lambda: replicas() == 0, timeout=30, what="the agent scaled to zero")

        # A failed invoice too; then billing is removed from the spec.
        # (Its time is now: the grace period runs from it.)
        failed_at = max(int(time.time()), now + 3)
        await deliver(stripe_event(f"evt_fail_{name}", wh.PAYMENT_FAILED, customer, failed_at))
        eventually(
            lambda: shows(PaymentFailed=("True", "InvoicePaymentFailed")),
            timeout=GRACE_SECONDS,
            what="PaymentFailed=True",
        )
    assert await inbox_rows(ledger_dsn) == 4
    kubectl.run(
        "patch", "tenant", name, "--type=json", "-p",
        json.dumps([{"op": "remove", "path": "/spec/billing"}]),
    )  # fmt: skip
    eventually(
        lambda: shows(
            PaymentFailed=("False", "BillingRemoved"),
            BillingReady=("True", "NoBilling"),
            Suspended=("False", "Active"),
            Ready=("True", "TenantReady"),
        ),
        timeout=30,
        what="PaymentFailed cleared and the suspension lifted once spec.billing is removed",
    )
    eventually(lambda: replicas() == 1, timeout=30, what="the agent back at 1")
