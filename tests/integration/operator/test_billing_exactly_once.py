"""Tenant onboarding bills exactly once across a SIGKILL between the Stripe creates and
the status writes (issue 14, "Must show": the stateful stand-in).

The operator runs against stripe-mock behind the stateful stand-in
(bmad_testbed.stripe_proxy). The stand-in does every customer create it receives but
withholds the answers, so when the operator is SIGKILLed every one of those customers
exists in "Stripe" and none is in a Tenant's status. Customer search is made to lag
(as Stripe's may, up to a minute), so after the restart only the idempotency key
stands between a retry and a second customer. The test then proves, from what the
stand-in kept: each Tenant has exactly one customer and one subscription, its status
names them, and the restarted operator did retry each create, with the same key,
answered by replay.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from bmad_integrations import billing
from bmad_testbed import stripe_proxy
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import condition, stripe_integration

pytestmark = pytest.mark.integration

SYSTEM_NS = "bmad-system"
TENANTS = 10


@pytest.fixture
def standin(kubectl: Kubectl, testbed_env: dict[str, str]) -> Iterator[stripe_proxy.StripeProxy]:
    """A stripe Integration in the operator's namespace, in front of the stand-in."""
    with (
        stripe_proxy.StripeProxy(testbed_env["BMAD_STRIPE_API_BASE"], search_lag=3600) as proxy,
        stripe_integration(
            kubectl, SYSTEM_NS, proxy.url, prefix="stripe-once", api_key=b"sk_test_exactlyonce"
        ) as name,
    ):
        proxy.integration = name  # type: ignore[attr-defined]
        yield proxy


@pytest.fixture
def tenant_names(kubectl: Kubectl, crds: list[str]) -> Iterator[list[str]]:
    suffix = secrets.token_hex(3)
    names = [f"once{i:02d}-{suffix}" for i in range(TENANTS)]
    try:
        yield names
    finally:
        for name in names:
            kubectl.run("delete", "tenant", name, "--ignore-not-found", "--wait=false", check=False)
            kubectl.run(
                "delete",
                "namespace",
                f"{name}-ns",
                "--ignore-not-found",
                "--wait=false",
                check=False,
            )


def tenant(name: str, integration: str) -> dict[str, Any]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "namespaces": [f"{name}-ns"],
            "billing": {"integration": integration, "priceId": "price_basic"},
        },
    }


def statuses(kubectl: Kubectl, names: list[str]) -> dict[str, dict[str, Any]]:
    wanted = set(names)
    return {
        item["metadata"]["name"]: item
        for item in kubectl.json("get", "tenants")["items"]
        if item["metadata"]["name"] in wanted
    }


def test_billing_is_exactly_once_when_killed_between_create_and_status_write(
    kubectl: Kubectl,
    operator: OperatorProcess,
    standin: stripe_proxy.StripeProxy,
    tenant_names: list[str],
) -> None:
    integration: str = standin.integration  # type: ignore[attr-defined]
    hold = standin.hold("POST", "/v1/customers")
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [tenant(n, integration) for n in tenant_names],
        }
    )
    # Kill once several creates are done in "Stripe" with no answer delivered (the SDK
    # runs in worker threads, so not all ten are in flight at once).
    deadline = time.monotonic() + 120
    while hold.count < 3:
        assert time.monotonic() < deadline, f"only {hold.count} customer creates reached Stripe"
        time.sleep(0.1)
    operator.kill()

    # The kill landed between each of those creates and its status write: Stripe has the
    # customers, no Tenant knows its own.
    before = statuses(kubectl, tenant_names)
    uids = {name: obj["metadata"]["uid"] for name, obj in before.items()}
    held = {c["metadata"][billing.TENANT_UID_METADATA] for c in standin.customers()}
    assert len(held) == hold.count >= 3, standin.calls("POST", "/v1/customers")
    saved = [n for n, obj in before.items() if (obj.get("status") or {}).get("billing")]
    assert saved == [], f"a status write beat the kill: {saved}"
    created_before = len(standin.calls("POST", "/v1/customers"))

    hold.release()
    operator.start()

    def all_billed() -> dict[str, dict[str, Any]] | None:
        found = statuses(kubectl, tenant_names)
        ready = [
            n
            for n, obj in found.items()
            if (condition(obj, "BillingReady") or {}).get("status") == "True"
        ]
        return found if len(ready) == TENANTS else None

    after: dict[str, dict[str, Any]] = eventually(
        all_billed, timeout=180, what="every tenant billed"
    )

    customers_by_uid: dict[str, list[str]] = defaultdict(list)
    for customer in standin.customers():
        customers_by_uid[customer["metadata"].get(billing.TENANT_UID_METADATA, "?")].append(
            customer["id"]
        )
    subs_by_uid: dict[str, list[str]] = defaultdict(list)
    for sub in standin.subscriptions():
        subs_by_uid[sub["metadata"].get(billing.TENANT_UID_METADATA, "?")].append(sub["id"])
    retries = standin.calls("POST", "/v1/customers")[created_before:]
    for name in tenant_names:
        uid = uids[name]
        saved = after[name]["status"]["billing"]
        assert customers_by_uid[uid] == [saved["customerId"]], f"{name}: {customers_by_uid[uid]}"
        assert subs_by_uid[uid] == [saved["subscriptionId"]], f"{name}: {subs_by_uid[uid]}"
        mine = [r for r in retries if r.param(f"metadata[{billing.TENANT_UID_METADATA}]") == uid]
        assert mine, f"{name}: no customer create after the restart"
        assert {r.idempotency_key for r in mine} == {billing.customer_key(uid)}
        if uid in held:
            # Created before the kill: the restarted operator retried with the same key,
            # and Stripe answered with the first customer.
            assert all(r.replayed for r in mine), f"{name}: a retry made a new customer"
        else:
            assert [r.replayed for r in mine] == [False], f"{name}: {mine}"
    assert len(standin.customers()) == TENANTS
    assert len(standin.creates("/v1/subscriptions")) == TENANTS
    assert all(c.idempotency_key for c in standin.calls("POST", "/v1/subscriptions"))
    assert "Traceback" not in operator.log_text()
