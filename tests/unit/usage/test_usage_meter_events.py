"""Ledger batches as Stripe meter events: values, identifiers, errors (pure parts)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
import stripe

from bmad_integrations import billing
from bmad_integrations.usage import reporter, store

pytestmark = pytest.mark.unit

AT = dt.datetime(2026, 6, 1, 10, 30, tzinfo=dt.UTC)
ACCOUNT = billing.StripeAccount(api_key="sk_test_MARKER99")


def batch(**changes: Any) -> store.Batch:
    fields: dict[str, Any] = {
        "batch_id": "mb_0123",
        "tenant": "acme",
        "customer_id": "cus_A",
        "state": "pending",
        "records": 3,
        "tokens_in": 1200,
        "tokens_out": 340,
        "costs": {"USD": Decimal("0.0123455"), "EUR": Decimal("1")},
        "bucket_start": AT.replace(minute=0),
        "event_time": AT,
        "created_at": AT,
    }
    fields.update(changes)
    return store.Batch(**fields)


def test_each_meter_counts_its_sum_of_the_batch() -> None:
    b = batch()
    assert reporter.Meter("in", "tokens_in").value(b) == 1200
    assert reporter.Meter("out", "tokens_out").value(b) == 340
    assert reporter.Meter("all", "tokens").value(b) == 1540
    # cost in micro-units, half to even: 12345.5 -> 12346 (odd 5 rounds up to even 6)
    assert reporter.Meter("usd", "cost", currency="USD").value(b) == 12346
    assert reporter.Meter("eur", "cost", currency="EUR", scale=2).value(b) == 100
    assert reporter.Meter("gbp", "cost", currency="GBP").value(b) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event_name": "", "quantity": "tokens"},
        {"event_name": "x" * 101, "quantity": "tokens"},
        {"event_name": "x", "quantity": "requests"},
        {"event_name": "x", "quantity": "cost"},
        {"event_name": "x", "quantity": "tokens", "currency": "USD"},
    ],
)
def test_bad_meters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="meter"):
        reporter.Meter(**kwargs)


def test_identifiers_are_stable_distinct_per_meter_and_short() -> None:
    a = reporter.identifier("mb_" + "f" * 24, reporter.Meter("bmad_input_tokens", "tokens_in"))
    b = reporter.identifier("mb_" + "f" * 24, reporter.Meter("bmad_output_tokens", "tokens_out"))
    assert a == reporter.identifier("mb_" + "f" * 24, reporter.Meter("bmad_input_tokens", "tokens"))
    assert a != b
    assert len(a) <= reporter.IDENTIFIER_MAX


def test_a_batch_becomes_one_event_per_meter_with_a_value() -> None:
    found = reporter.events(batch(tokens_out=0), reporter.DEFAULT_METERS)
    assert [(e.event_name, e.value, e.customer_id) for e in found] == [
        ("bmad_input_tokens", 1200, "cus_A")
    ]
    assert found[0].timestamp == int(AT.timestamp())
    assert reporter.events(batch(customer_id=None, state="unbilled"), reporter.DEFAULT_METERS) == []


def error(cls: type[stripe.StripeError], status: int | None) -> stripe.StripeError:
    message = f"failed with key {ACCOUNT.api_key}"
    if cls is stripe.InvalidRequestError:
        return stripe.InvalidRequestError(message, "event_name", http_status=status)
    return cls(message, http_status=status)


@pytest.mark.parametrize(
    ("exc", "transient", "account"),
    [
        (error(stripe.APIConnectionError, None), True, False),
        (error(stripe.RateLimitError, 429), True, False),
        (error(stripe.APIError, 503), True, False),
        (error(stripe.AuthenticationError, 401), True, True),
        (error(stripe.PermissionError, 403), True, True),
        (error(stripe.InvalidRequestError, 400), False, False),
    ],
)
def test_stripe_errors_are_retried_or_not_and_never_quote_the_key(
    exc: stripe.StripeError, transient: bool, account: bool
) -> None:
    found = reporter.classify(exc, ACCOUNT)
    assert (found.transient, found.account_problem) == (transient, account)
    assert ACCOUNT.api_key not in found.message


def test_a_target_is_billed_with_both_a_customer_and_an_account() -> None:
    reporter.Target(customer_id=None)
    reporter.Target(customer_id="cus_A", account=ACCOUNT)
    with pytest.raises(ValueError, match="both a customer and an account"):
        reporter.Target(customer_id="cus_A")
