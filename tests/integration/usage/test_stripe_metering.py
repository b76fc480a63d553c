"""Ledger rows to Stripe meter events, exactly once: the real PostgreSQL ledger and
stripe-mock (v0.203.0 serves POST /v1/billing/meter_events) behind the stateful stand-in,
which counts each identifier once, as Stripe bills, and lists any sent twice."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from bmad_integrations import billing
from bmad_integrations.usage import prices, record, reporter, store
from bmad_testbed import stripe_proxy

pytestmark = pytest.mark.integration

# Half past an hour: the minutes below (up to 19) never cross into another hour bucket.
BASE = dt.datetime.now(dt.UTC).replace(minute=30, second=0, microsecond=0) - dt.timedelta(hours=1)


@pytest.fixture
def proxy(stripe_api_base: str) -> Iterator[stripe_proxy.StripeProxy]:
    with stripe_proxy.StripeProxy(stripe_api_base) as running:
        yield running


def account(proxy: stripe_proxy.StripeProxy) -> billing.StripeAccount:
    return billing.StripeAccount(api_key="sk_test_metering", api_base=proxy.url)


def new_customer(proxy: stripe_proxy.StripeProxy, name: str) -> str:
    client = stripe.StripeClient("sk_test_metering", base_addresses={"api": proxy.url})
    return str(client.v1.customers.create(params={"name": name}).id)


def rows(tenant: str, count: int, *, start: int = 0, hours: int = 3) -> list[store.LedgerRow]:
    found = []
    for n in range(start, start + count):
        rec = record.UsageRecord(
            record_id=record.task_record_id(f"{tenant}-{n}"),
            tenant=tenant,
            namespace=tenant,
            agent="analyst",
            provider="openai",
            model="gpt-4o",
            tokens_in=100 + n,
            tokens_out=7 * n,
            occurred_at=BASE - dt.timedelta(hours=n % hours, minutes=n % 20),
            source="task",
        )
        price = prices.Price(prices.decimal.Decimal("2.5"), prices.decimal.Decimal(10), "USD")
        cost = prices.Cost(
            prices.cost(price, tokens_in=rec.tokens_in, tokens_out=rec.tokens_out), price
        )
        found.append(store.LedgerRow(rec, cost))
    return found


def sums(items: list[store.LedgerRow]) -> tuple[int, int]:
    return sum(r.record.tokens_in for r in items), sum(r.record.tokens_out for r in items)


def fast(ledger: store.LedgerStore, sender: reporter.Sender, **options: Any) -> reporter.Reporter:
    return reporter.Reporter(ledger, sender, backoff=0.01, backoff_max=0.05, **options)


async def test_usage_is_metered_once_per_billed_tenant_and_never_for_an_unbilled_one(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    acme, globex, initech = rows("acme", 120), rows("globex", 40), rows("initech", 25)
    await ledger.insert(acme + globex + initech)
    cus_acme, cus_globex = new_customer(proxy, "acme"), new_customer(proxy, "globex")
    targets = {
        "acme": reporter.Target(cus_acme, account(proxy)),
        "globex": reporter.Target(cus_globex, account(proxy)),
        "initech": reporter.Target(None),
    }
    job = fast(ledger, reporter.StripeSender())
    stats = await job.report_once(targets)
    assert stats.records_reported == 160
    assert stats.batches_unbilled >= 1
    assert proxy.duplicate_identifiers() == []
    assert proxy.meter_totals() == {
        ("bmad_input_tokens", cus_acme): sums(acme)[0],
        ("bmad_output_tokens", cus_acme): sums(acme)[1],
        ("bmad_input_tokens", cus_globex): sums(globex)[0],
        ("bmad_output_tokens", cus_globex): sums(globex)[1],
    }
    assert all(e.identifier == e.idempotency_key for e in proxy.meter_events())
    assert await ledger.unreported() == {}
    assert await ledger.pending() == []
    # Nothing new, nothing sent; new usage is sent on the next pass.
    sent = len(proxy.meter_events())
    assert (await job.report_once(targets)).events_sent == 0
    assert len(proxy.meter_events()) == sent
    more = rows("acme", 10, start=500)
    await ledger.insert(more)
    await job.report_once(targets)
    assert proxy.meter_totals()[("bmad_input_tokens", cus_acme)] == sums(acme)[0] + sums(more)[0]
    assert proxy.duplicate_identifiers() == []


async def test_a_cost_meter_counts_micro_units_of_its_currency(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    acme = rows("acme", 30, hours=1)
    await ledger.insert(acme)
    cus = new_customer(proxy, "acme")
    meters = [reporter.Meter("bmad_cost_usd", "cost", currency="USD")]
    await fast(ledger, reporter.StripeSender(), meters=meters, bucket_seconds=86400).report_once(
        {"acme": reporter.Target(cus, account(proxy))}
    )
    expected = sum(r.cost.amount for r in acme if r.cost) * 10**6
    assert proxy.meter_totals() == {("bmad_cost_usd", cus): int(expected.to_integral_value())}


class KilledAfterSendingError(Exception):
    """The reporter's process dies right after Stripe answered (before mark_reported)."""


class DiesAfterSending:
    def __init__(self, real: reporter.Sender, after: int) -> None:
        self.real, self.after, self.sent = real, after, 0

    async def send(self, account: billing.StripeAccount, event: reporter.MeterEvent) -> None:
        await self.real.send(account, event)
        self.sent += 1
        if self.sent == self.after:
            raise KilledAfterSendingError


async def test_a_reporter_that_died_after_sending_resends_the_same_events_harmlessly(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    acme = rows("acme", 60)
    await ledger.insert(acme)
    cus = new_customer(proxy, "acme")
    targets = {"acme": reporter.Target(cus, account(proxy))}
    with pytest.raises(KilledAfterSendingError):
        await fast(ledger, DiesAfterSending(reporter.StripeSender(), after=3)).report_once(targets)
    assert len(await ledger.pending()) >= 2  # reserved; one half-sent, others not yet
    await fast(ledger, reporter.StripeSender()).report_once(targets)
    replays = [c for c in proxy.calls("POST", "/v1/billing/meter_events") if c.replayed]
    assert replays, "the restarted reporter did not resend the half-sent batch"
    assert proxy.duplicate_identifiers() == []
    assert proxy.meter_totals() == {
        ("bmad_input_tokens", cus): sums(acme)[0],
        ("bmad_output_tokens", cus): sums(acme)[1],
    }
    assert await ledger.pending() == []


async def test_transient_failures_are_retried_with_the_same_identifier(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    await ledger.insert(rows("acme", 5, hours=1))
    cus = new_customer(proxy, "acme")
    proxy.fail_next("POST", "/v1/billing/meter_events", status=500, count=1)
    proxy.fail_next("POST", "/v1/billing/meter_events", status=429, count=1)
    stats = await fast(ledger, reporter.StripeSender()).report_once(
        {"acme": reporter.Target(cus, account(proxy))}
    )
    assert stats.batches_reported == 1
    calls = proxy.calls("POST", "/v1/billing/meter_events")
    assert [c.status for c in calls] == [500, 429, 200, 200]
    assert len({c.param("identifier") for c in calls[:3]}) == 1
    assert proxy.duplicate_identifiers() == []


async def test_an_outage_leaves_the_batch_for_the_next_pass(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    acme = rows("acme", 5, hours=1)
    await ledger.insert(acme)
    cus = new_customer(proxy, "acme")
    targets = {"acme": reporter.Target(cus, account(proxy))}
    proxy.fail_next("POST", "/v1/billing/meter_events", status=503, count=3)
    first = await fast(ledger, reporter.StripeSender(), attempts=3).report_once(targets)
    assert (first.batches_reported, first.batches_deferred) == (0, 1)
    [pending] = await ledger.pending()
    assert pending.attempts == 1
    assert "503" in (pending.last_error or "")
    second = await fast(ledger, reporter.StripeSender()).report_once(targets)
    assert second.batches_reported == 1
    assert proxy.meter_totals()[("bmad_input_tokens", cus)] == sums(acme)[0]


async def test_a_refused_event_fails_its_batch_and_a_refused_key_stops_the_account(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    await ledger.insert(rows("acme", 5, hours=1) + rows("globex", 5, hours=1))
    cus = new_customer(proxy, "acme")
    proxy.fail_next("POST", "/v1/billing/meter_events", status=400, count=1, code="invalid")
    stats = await fast(ledger, reporter.StripeSender()).report_once(
        {"acme": reporter.Target(cus, account(proxy))}
    )
    assert stats.batches_failed == 1
    failed = await ledger.pool.fetchrow("SELECT state, last_error FROM meter_batches")
    assert failed["state"] == "failed"
    assert "400" in failed["last_error"]
    assert "sk_test" not in failed["last_error"]
    proxy.fail_next("POST", "/v1/billing/meter_events", status=401, count=1)
    stats = await fast(ledger, reporter.StripeSender()).report_once(
        {"globex": reporter.Target(new_customer(proxy, "globex"), account(proxy))}
    )
    assert (stats.batches_reported, stats.batches_deferred) == (0, 1)


async def test_a_batch_tried_more_than_a_day_ago_is_stale_not_resent(
    ledger: store.LedgerStore, proxy: stripe_proxy.StripeProxy
) -> None:
    await ledger.insert(rows("acme", 5, hours=1))
    cus = new_customer(proxy, "acme")
    targets = {"acme": reporter.Target(cus, account(proxy))}
    proxy.fail_next("POST", "/v1/billing/meter_events", status=503, count=1)
    await fast(ledger, reporter.StripeSender(), attempts=1).report_once(targets)
    later = fast(
        ledger,
        reporter.StripeSender(),
        clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=24),
    )
    stats = await later.report_once(targets)
    assert stats.batches_stale == 1
    state = await ledger.pool.fetchval("SELECT state FROM meter_batches")
    assert state == "stale"
    assert [c.status for c in proxy.calls("POST", "/v1/billing/meter_events")] == [503]
