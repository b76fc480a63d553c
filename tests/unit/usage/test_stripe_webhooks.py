"""Stripe webhooks: the signature, the events, their order, and the endpoint."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
import stripe

from bmad_integrations import stripe_webhooks as wh

pytestmark = pytest.mark.unit

SECRET = "whsec_test_3b1f0c9a8e7d6c5b4a39281706f5e4d3"
NOW = 1_780_000_000


def event(kind: str, *, event_id: str = "evt_1", created: int = NOW, **obj: Any) -> bytes:
    body = {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created": created,
        "data": {"object": {"customer": "cus_A", **obj}},
    }
    return json.dumps(body).encode()


def header(payload: bytes, *, secret: str = SECRET, at: int = NOW, extra: str = "") -> str:
    return f"t={at},v1={wh.signature(payload, secret, at)}{extra}"


def test_our_signature_is_the_one_the_stripe_sdk_verifies() -> None:
    payload = event("invoice.paid")
    stripe.WebhookSignature.verify_header(
        payload.decode(), header(payload, at=int(time.time())), SECRET, tolerance=300
    )
    sdk_header = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), SECRET, timestamp=NOW
    )
    wh.verify(payload, sdk_header, [SECRET], now=NOW)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            payload.decode(), header(payload, secret="whsec_other", at=int(time.time())), SECRET
        )


def test_a_correct_signature_within_the_tolerance_is_accepted() -> None:
    payload = event("invoice.paid")
    wh.verify(payload, header(payload), [SECRET], now=NOW + 299)
    wh.verify(payload, header(payload), [SECRET], now=NOW - 299)
    # rotation: an old v0 scheme and a second v1 are ignored unless one matches
    wh.verify(payload, header(payload, extra=",v0=abc,v1=00"), [SECRET], now=NOW)
    wh.verify(payload, header(payload), ["whsec_old", SECRET], now=NOW)


@pytest.mark.parametrize(
    ("make_header", "code"),
    [
        (lambda p: None, "bad_signature"),
        (lambda p: "", "bad_signature"),
        (lambda p: header(p, secret="whsec_other"), "bad_signature"),
        (lambda p: header(p + b" "), "bad_signature"),
        (lambda p: f"v1={wh.signature(p, SECRET, NOW)}", "bad_signature"),
        (lambda p: f"t={NOW}", "bad_signature"),
        (lambda p: f"t=soon,v1={wh.signature(p, SECRET, NOW)}", "bad_signature"),
        (lambda p: f"t={NOW},v0={wh.signature(p, SECRET, NOW)}", "bad_signature"),
        (lambda p: header(p, at=NOW - 301), "stale_signature"),
        (lambda p: header(p, at=NOW + 301), "stale_signature"),
    ],
)
def test_bad_or_stale_signatures_are_refused(make_header: Any, code: str) -> None:
    payload = event("invoice.paid")
    with pytest.raises(wh.WebhookError) as caught:
        wh.verify(payload, make_header(payload), [SECRET], now=NOW)
    assert caught.value.code == code


def test_no_secret_configured_refuses_everything() -> None:
    payload = event("invoice.paid")
    with pytest.raises(wh.WebhookError) as caught:
        wh.verify(payload, header(payload), [], now=NOW)
    assert caught.value.code == "not_configured"


def test_events_are_parsed_into_what_billing_needs() -> None:
    failed = wh.parse(event("invoice.payment_failed", subscription="sub_1"))
    assert failed == wh.PaymentEvent(
        "evt_1",
        "invoice.payment_failed",
        dt.datetime.fromtimestamp(NOW, dt.UTC),
        "cus_A",
        "sub_1",
        None,
    )
    nested = wh.parse(
        event(
            "invoice.paid",
            parent={"subscription_details": {"subscription": "sub_2"}},
        )
    )
    assert nested.subscription_id == "sub_2"
    deleted = wh.parse(event("customer.subscription.deleted", id="sub_1", status="active"))
    assert (deleted.subscription_id, deleted.subscription_status) == ("sub_1", "canceled")
    updated = wh.parse(event("customer.subscription.updated", id="sub_1", status="past_due"))
    assert updated.subscription_status == "past_due"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"object": "customer"}', b'{"object": "event", "id": "evt"}'],
)
def test_payloads_that_are_not_events_are_refused(body: bytes) -> None:
    with pytest.raises(wh.WebhookError) as caught:
        wh.parse(body)
    assert caught.value.code == "invalid_payload"


def at(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(NOW + seconds, dt.UTC)


def ev(kind: str, seconds: int, **extra: Any) -> wh.PaymentEvent:
    return wh.PaymentEvent(f"evt_{kind}_{seconds}", kind, at(seconds), "cus_A", **extra)


def test_a_failure_starts_an_unpaid_streak_that_a_later_payment_ends() -> None:
    state = wh.PaymentState("cus_A")
    state = wh.apply(state, ev(wh.PAYMENT_FAILED, 0))
    state = wh.apply(state, ev(wh.PAYMENT_FAILED, 100))
    assert state.failed_since == at(0)
    assert state.last_failure_at == at(100)
    assert wh.apply(state, ev(wh.PAID, 50)).failed_since == at(0)  # paid before the last failure
    paid = wh.apply(state, ev(wh.PAID, 200))
    assert paid.failed_since is None
    assert paid.last_paid_at == at(200)


def test_events_out_of_order_never_let_an_older_one_win() -> None:
    paid_first = wh.apply(wh.PaymentState("cus_A"), ev(wh.PAID, 200))
    late_failure = wh.apply(paid_first, ev(wh.PAYMENT_FAILED, 100))
    assert late_failure.failed_since is None  # that invoice was paid since
    newer = wh.apply(
        wh.PaymentState("cus_A"),
        ev(wh.SUBSCRIPTION_UPDATED, 300, subscription_id="sub_1", subscription_status="active"),
    )
    older = wh.apply(
        newer,
        ev(wh.SUBSCRIPTION_DELETED, 100, subscription_id="sub_1", subscription_status="canceled"),
    )
    assert older.subscription_status == "active"


def test_other_event_types_change_nothing() -> None:
    state = wh.PaymentState("cus_A")
    assert wh.apply(state, ev("customer.created", 1)) == state


class FakeInbox:
    def __init__(self, *, broken: bool = False) -> None:
        self.seen: set[str] = set()
        self.broken = broken

    async def receive(self, event: wh.PaymentEvent) -> bool:
        if self.broken:
            raise ConnectionError("database down")
        fresh = event.event_id not in self.seen
        self.seen.add(event.event_id)
        return fresh


async def test_the_endpoint_answers_400_and_records_nothing_for_a_bad_request() -> None:
    inbox = FakeInbox()
    payload = event("invoice.payment_failed")
    bad = await wh.handle(
        payload, header(payload, secret="x"), secrets=[SECRET], inbox=inbox, now=NOW
    )
    stale = await wh.handle(
        payload, header(payload, at=NOW - 3600), secrets=[SECRET], inbox=inbox, now=NOW
    )
    assert (bad.status, bad.body["error"]["code"]) == (400, "bad_signature")
    assert (stale.status, stale.body["error"]["code"]) == (400, "stale_signature")
    assert inbox.seen == set()


async def test_the_endpoint_records_an_event_once() -> None:
    inbox = FakeInbox()
    payload = event("invoice.payment_failed")
    first = await wh.handle(payload, header(payload), secrets=[SECRET], inbox=inbox, now=NOW)
    again = await wh.handle(payload, header(payload), secrets=[SECRET], inbox=inbox, now=NOW)
    assert (first.status, first.body["duplicate"]) == (200, False)
    assert (again.status, again.body["duplicate"]) == (200, True)


async def test_a_database_failure_is_503_so_stripe_retries() -> None:
    payload = event("invoice.paid")
    answer = await wh.handle(
        payload, header(payload), secrets=[SECRET], inbox=FakeInbox(broken=True), now=NOW
    )
    assert answer.status == 503


async def test_a_huge_body_is_refused_before_anything_else() -> None:
    payload = b"x" * (wh.MAX_BODY_BYTES + 1)
    answer = await wh.handle(payload, None, secrets=[SECRET], inbox=FakeInbox(), now=NOW)
    assert answer.status == 413
