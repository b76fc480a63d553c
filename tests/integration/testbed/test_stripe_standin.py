"""The stateful Stripe stand-in (bmad_testbed.stripe_proxy) in front of the real
stripe-mock: what the billing tests rely on behaves like Stripe."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import stripe

from bmad_testbed import stripe_proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(stripe_api_base: str) -> Iterator[stripe_proxy.StripeProxy]:
    with stripe_proxy.StripeProxy(stripe_api_base) as running:
        yield running


def client(proxy: stripe_proxy.StripeProxy) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_standin", base_addresses={"api": proxy.url}, max_network_retries=0
    )


def test_a_repeated_idempotency_key_gets_the_first_answer(proxy: stripe_proxy.StripeProxy) -> None:
    c = client(proxy)
    params = {"name": "Acme", "metadata": {"bmad_tenant_uid": "u-1"}}
    first = c.v1.customers.create(params=params, options={"idempotency_key": "k-1"})  # type: ignore[arg-type]
    again = c.v1.customers.create(params=params, options={"idempotency_key": "k-1"})  # type: ignore[arg-type]
    other = c.v1.customers.create(params=params, options={"idempotency_key": "k-2"})  # type: ignore[arg-type]
    assert first.id == again.id != other.id
    assert [r.replayed for r in proxy.calls("POST", "/v1/customers")] == [False, True, False]
    assert len(proxy.creates("/v1/customers")) == 2
    assert len(proxy.customers()) == 2
    with pytest.raises(stripe.IdempotencyError):
        c.v1.customers.create(params={"name": "Other"}, options={"idempotency_key": "k-1"})


def test_customers_are_found_by_metadata_after_the_search_lag(stripe_api_base: str) -> None:
    with stripe_proxy.StripeProxy(stripe_api_base, search_lag=0.5) as proxy:
        c = client(proxy)
        made = c.v1.customers.create(params={"metadata": {"bmad_tenant_uid": "u-7"}})
        query = {"query": "metadata['bmad_tenant_uid']:'u-7'"}
        assert c.v1.customers.search(params=query).data == []  # not searchable yet
        time.sleep(0.6)
        assert [x.id for x in c.v1.customers.search(params=query).data] == [made.id]
        assert (
            c.v1.customers.search(params={"query": "metadata['bmad_tenant_uid']:'u-8'"}).data == []
        )


def test_subscriptions_are_kept_listed_and_cancelled(proxy: stripe_proxy.StripeProxy) -> None:
    c = client(proxy)
    sub = c.v1.subscriptions.create(
        params={"customer": "cus_1", "items": [{"price": "price_x"}], "metadata": {"k": "v"}}
    )
    listed = c.v1.subscriptions.list(params={"customer": "cus_1", "status": "all"}).data
    assert [(s.id, s.status, s["items"].data[0].price.id, s.metadata["k"]) for s in listed] == [
        (sub.id, "active", "price_x", "v")
    ]
    assert c.v1.subscriptions.list(params={"customer": "cus_2"}).data == []
    c.v1.subscriptions.cancel(sub.id)
    assert c.v1.subscriptions.list(params={"customer": "cus_1"}).data == []
    assert (
        c.v1.subscriptions.list(params={"customer": "cus_1", "status": "all"}).data[0].status
        == "canceled"
    )
    with pytest.raises(stripe.InvalidRequestError):
        c.v1.subscriptions.cancel("sub_unknown")


def test_meter_events_are_counted_once_per_identifier(proxy: stripe_proxy.StripeProxy) -> None:
    c = client(proxy)

    def send(identifier: str, value: int, key: str) -> None:
        c.v1.billing.meter_events.create(
            params={
                "event_name": "bmad_input_tokens",
                "payload": {"stripe_customer_id": "cus_1", "value": str(value)},
                "identifier": identifier,
            },
            options={"idempotency_key": key},
        )

    send("a", 10, "ka")
    send("a", 10, "ka")  # a retry: replayed, not a second event
    send("b", 5, "kb")
    assert proxy.duplicate_identifiers() == []
    assert proxy.meter_totals() == {("bmad_input_tokens", "cus_1"): 15}
    send("b", 5, "kb-other-key")  # the same identifier under another key: a duplicate
    assert proxy.duplicate_identifiers() == ["b"]
    assert proxy.meter_totals() == {("bmad_input_tokens", "cus_1"): 15}  # Stripe dedupes


def test_faults_are_injected_before_stripe_mock(proxy: stripe_proxy.StripeProxy) -> None:
    proxy.fail_next("POST", "/v1/customers", status=429, count=1)
    c = client(proxy)
    with pytest.raises(stripe.RateLimitError):
        c.v1.customers.create(params={"name": "x"}, options={"idempotency_key": "k"})
    made = c.v1.customers.create(params={"name": "x"}, options={"idempotency_key": "k"})
    assert made.id.startswith("cus_")
    assert [r.status for r in proxy.calls("POST", "/v1/customers")] == [429, 200]


def test_a_held_answer_is_done_but_not_sent_until_released(
    proxy: stripe_proxy.StripeProxy,
) -> None:
    hold = proxy.hold("POST", "/v1/customers")
    found: list[str] = []
    thread = threading.Thread(
        target=lambda: found.append(client(proxy).v1.customers.create(params={"name": "h"}).id)
    )
    thread.start()
    deadline = time.monotonic() + 30
    while hold.count == 0:
        assert time.monotonic() < deadline, "the create never reached the proxy"
        time.sleep(0.02)
    assert len(proxy.customers()) == 1  # the work is done
    assert found == []  # the answer is not delivered
    hold.release()
    thread.join(timeout=30)
    assert found == [proxy.customers()[0]["id"]]
