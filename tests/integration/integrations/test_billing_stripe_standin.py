"""Tenant billing (bmad_integrations.billing) against stripe-mock behind the stateful
stand-in: one customer per Tenant uid, one live subscription per Tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from bmad_integrations import billing
from bmad_testbed import stripe_proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(stripe_api_base: str) -> Iterator[stripe_proxy.StripeProxy]:
    with stripe_proxy.StripeProxy(stripe_api_base) as running:
        yield running


def account(proxy: stripe_proxy.StripeProxy) -> billing.StripeAccount:
    return billing.StripeAccount(api_key="sk_test_billing", api_base=proxy.url)


async def customer(proxy: stripe_proxy.StripeProxy, tenant: str, uid: str) -> str:
    return await billing.ensure_customer(
        account(proxy), tenant=tenant, tenant_uid=uid, email=None, name=tenant
    )


async def subscription(proxy: stripe_proxy.StripeProxy, cus: str, uid: str, price: str) -> str:
    return await billing.ensure_subscription(
        account(proxy), customer_id=cus, price_id=price, tenant="acme", tenant_uid=uid
    )


async def test_a_tenant_is_found_by_its_uid_and_not_created_twice(
    proxy: stripe_proxy.StripeProxy,
) -> None:
    uid = str(uuid.uuid4())
    first = await customer(proxy, "acme", uid)
    proxy.expire_idempotency_keys()  # a day later: only the look-up can find it
    again = await customer(proxy, "acme", uid)
    assert first == again
    assert len(proxy.creates("/v1/customers")) == 1
    made = proxy.customers()[0]
    assert made["metadata"] == {"bmad_tenant": "acme", "bmad_tenant_uid": uid}


async def test_a_recreated_tenant_of_the_same_name_gets_a_new_customer(
    proxy: stripe_proxy.StripeProxy,
) -> None:
    old = await customer(proxy, "acme", str(uuid.uuid4()))
    new = await customer(proxy, "acme", str(uuid.uuid4()))
    assert old != new
    assert len(proxy.customers()) == 2


async def test_before_search_sees_it_the_idempotency_key_replays_the_first_customer(
    stripe_api_base: str,
) -> None:
    with stripe_proxy.StripeProxy(stripe_api_base, search_lag=3600) as lagging:
        uid = str(uuid.uuid4())
        first = await customer(lagging, "acme", uid)
        again = await customer(lagging, "acme", uid)
        assert first == again
        creates = lagging.calls("POST", "/v1/customers")
        assert [c.replayed for c in creates] == [False, True]
        assert {c.idempotency_key for c in creates} == {billing.customer_key(uid)}
        assert len(lagging.customers()) == 1


async def test_an_existing_subscription_is_found_before_one_is_created(
    proxy: stripe_proxy.StripeProxy,
) -> None:
    uid = str(uuid.uuid4())
    cus = await customer(proxy, "acme", uid)
    first = await subscription(proxy, cus, uid, "price_basic")
    proxy.expire_idempotency_keys()  # a day later: only the look-up can find it
    again = await subscription(proxy, cus, uid, "price_basic")
    assert first == again
    assert len(proxy.creates("/v1/subscriptions")) == 1
    # Another tenant's subscription on the same customer is not this tenant's.
    other_uid = str(uuid.uuid4())
    assert await subscription(proxy, cus, other_uid, "price_basic") != first


async def test_a_new_price_id_does_not_add_a_second_subscription(
    proxy: stripe_proxy.StripeProxy,
) -> None:
    uid = str(uuid.uuid4())
    cus = await customer(proxy, "acme", uid)
    basic = await subscription(proxy, cus, uid, "price_basic")
    assert await subscription(proxy, cus, uid, "price_pro") == basic
    assert len(proxy.creates("/v1/subscriptions")) == 1


async def test_a_cancelled_subscription_is_replaced_not_replayed(
    proxy: stripe_proxy.StripeProxy,
) -> None:
    uid = str(uuid.uuid4())
    cus = await customer(proxy, "acme", uid)
    first = await subscription(proxy, cus, uid, "price_basic")
    await billing.cancel_subscription(account(proxy), first)
    second = await subscription(proxy, cus, uid, "price_basic")
    assert second != first
    keys = [c.idempotency_key for c in proxy.creates("/v1/subscriptions")]
    assert keys == [
        billing.subscription_key(uid, "price_basic"),
        billing.subscription_key(uid, "price_basic", 1),
    ]
    live = [s for s in proxy.subscriptions() if s["status"] == "active"]
    assert [s["id"] for s in live] == [second]
