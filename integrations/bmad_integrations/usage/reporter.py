"""Ledger rows to Stripe billing meter events, exactly once.

For each billed tenant: unreported rows go into batches (`store.reserve`: one per time
bucket, persisted *before* anything is sent), each batch becomes one meter event per
configured meter (``POST /v1/billing/meter_events``: ``event_name``,
``payload[stripe_customer_id]``, ``payload[value]``, ``timestamp``), and the batch is
marked reported once Stripe accepted them all.

Why this is exactly once:
- a batch's rows are fixed when it is reserved, in the same transaction that creates
  it, so a row is in one batch only;
- every event's ``identifier`` and ``Idempotency-Key`` are derived from the batch id
  and the meter, so a resend after a crash or a lost reply is the same event: Stripe
  answers a repeated key with the first answer and dedupes identifiers;
- Stripe keeps both for (at least) 24 hours, so a pending batch that was tried and is
  older than `STALE_AFTER` is not resent blindly: it becomes ``stale`` for a human to
  check against Stripe's meter summaries (docs/billing.md says how).

A tenant without billing (no customer) is metered — its rows are batched as
``unbilled`` and never sent. Connection errors, rate limits and 5xx answers are
retried with exponential backoff; other refusals mark the batch ``failed`` with
Stripe's message. Nothing here reads Prometheus.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bmad_integrations import billing, lazy
from bmad_integrations.usage import prices, store

if TYPE_CHECKING:
    import stripe
else:  # imported when first used: not every operator bills
    stripe = lazy.module("stripe")

log = logging.getLogger(__name__)

Quantity = Literal["tokens_in", "tokens_out", "tokens", "cost"]
QUANTITIES: tuple[Quantity, ...] = ("tokens_in", "tokens_out", "tokens", "cost")

# Stripe dedupes identifiers and idempotency keys for at least 24 hours; leave margin.
STALE_AFTER = dt.timedelta(hours=23)
# Stripe refuses meter events older than 35 days.
MAX_EVENT_AGE = dt.timedelta(days=35) - dt.timedelta(hours=1)
IDENTIFIER_MAX = 100


@dataclass(frozen=True)
class Meter:
    """One Stripe meter: its event name and which sum of a batch it counts.

    ``cost`` counts the batch's cost in ``currency`` times 10**``scale`` (micro-units
    by default), rounded half to even: Stripe meter values are whole numbers.
    """

    event_name: str
    quantity: Quantity
    currency: str | None = None
    scale: int = 6

    def __post_init__(self) -> None:
        if not 0 < len(self.event_name) <= IDENTIFIER_MAX:
            raise ValueError("a meter's event name has 1-100 characters")
        if self.quantity not in QUANTITIES:
            raise ValueError(f"a meter's quantity is one of {QUANTITIES}")
        if (self.quantity == "cost") != (self.currency is not None):
            raise ValueError("a cost meter names its currency, and only a cost meter does")

    def value(self, batch: store.Batch) -> int:
        if self.quantity == "tokens_in":
            return batch.tokens_in
        if self.quantity == "tokens_out":
            return batch.tokens_out
        if self.quantity == "tokens":
            return batch.tokens_in + batch.tokens_out
        amount = batch.costs.get(self.currency or "", decimal.Decimal(0))
        return int((amount * (decimal.Decimal(10) ** self.scale)).to_integral_value())


DEFAULT_METERS = (
    Meter("bmad_input_tokens", "tokens_in"),
    Meter("bmad_output_tokens", "tokens_out"),
)


def parse_meters(text: str) -> tuple[Meter, ...]:
    """The meters of a setting such as ``bmad_input_tokens=tokens_in,
    bmad_output_tokens=tokens_out,bmad_cost_usd=cost:USD`` (a quantity of
    `QUANTITIES`; ``cost:<currency>[:<scale>]``, the cost in that currency times
    10**scale, 6 by default); an empty setting is `DEFAULT_METERS`. Raises ValueError
    with what to change."""
    if not text.strip():
        return DEFAULT_METERS
    meters: list[Meter] = []
    for item in (part.strip() for part in text.split(",")):
        name, sep, quantity = item.partition("=")
        name, quantity = name.strip(), quantity.strip()
        if not sep or not name or not quantity:
            raise ValueError(
                f"{item!r} is not <event name>=<quantity> (a quantity is one of "
                f"{', '.join(QUANTITIES)}, cost as cost:<currency>[:<scale>])"
            )
        if any(m.event_name == name for m in meters):
            raise ValueError(f"the event name {name!r} is given twice")
        kind, _, rest = quantity.partition(":")
        if kind not in QUANTITIES:
            raise ValueError(
                f"{item!r}: the quantity {kind!r} is not one of {', '.join(QUANTITIES)}"
            )
        if kind != "cost":
            if rest:
                raise ValueError(f"{item!r}: only a cost meter takes a currency")
            meters.append(Meter(name, kind))
            continue
        currency, _, scale = rest.partition(":")
        if not re.fullmatch(prices.CURRENCY, currency):
            raise ValueError(f"{item!r}: a cost meter names an ISO 4217 currency, as cost:USD")
        if scale and not (scale.isdigit() and int(scale) <= 9):
            raise ValueError(f"{item!r}: the scale is a whole number from 0 to 9")
        meters.append(Meter(name, "cost", currency=currency, scale=int(scale or 6)))
    return tuple(meters)


def identifier(batch_id: str, meter: Meter) -> str:
    """The event's identifier (and idempotency key): the same on every resend."""
    digest = hashlib.sha256(meter.event_name.encode()).hexdigest()[:12]
    return f"{batch_id}.{digest}"


@dataclass(frozen=True)
class MeterEvent:
    event_name: str
    customer_id: str
    value: int
    identifier: str
    timestamp: int


def events(batch: store.Batch, meters: Sequence[Meter]) -> list[MeterEvent]:
    """The meter events of a batch (none for a meter whose value is 0)."""
    if batch.customer_id is None:
        return []
    found = []
    for meter in meters:
        value = meter.value(batch)
        if value <= 0:
            continue
        found.append(
            MeterEvent(
                event_name=meter.event_name,
                customer_id=batch.customer_id,
                value=value,
                identifier=identifier(batch.batch_id, meter),
                timestamp=int(batch.event_time.timestamp()),
            )
        )
    return found


class SendError(Exception):
    """Stripe did not take an event. ``transient``: worth retrying as it is."""

    def __init__(self, message: str, *, transient: bool, account_problem: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.account_problem = account_problem


class Sender(Protocol):
    async def send(self, account: billing.StripeAccount, event: MeterEvent) -> None: ...


class StripeSender:
    """Meter events through the Stripe SDK (in a worker thread; the SDK is blocking)."""

    def _client(self, account: billing.StripeAccount) -> stripe.StripeClient:
        kwargs: dict[str, Any] = {"max_network_retries": 0}
        if account.api_base:
            kwargs["base_addresses"] = {"api": account.api_base}
        return stripe.StripeClient(account.api_key, **kwargs)

    def _send_sync(self, account: billing.StripeAccount, event: MeterEvent) -> None:
        client = self._client(account)
        try:
            client.v1.billing.meter_events.create(
                params={
                    "event_name": event.event_name,
                    "payload": {
                        "stripe_customer_id": event.customer_id,
                        "value": str(event.value),
                    },
                    "identifier": event.identifier,
                    "timestamp": event.timestamp,
                },
                options={"idempotency_key": event.identifier},
            )
        except stripe.StripeError as exc:
            raise classify(exc, account) from None

    async def send(self, account: billing.StripeAccount, event: MeterEvent) -> None:
        await asyncio.to_thread(self._send_sync, account, event)


def classify(exc: stripe.StripeError, account: billing.StripeAccount) -> SendError:
    """Whether a Stripe error is worth a retry; the message never quotes the key."""
    text = billing.redact(exc, account)
    status = getattr(exc, "http_status", None)
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError) or (
        status is not None and status >= 500
    ):
        return SendError(f"Stripe is unavailable ({status or 'no answer'}): {text}", transient=True)
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return SendError(
            f"Stripe refused the API key ({status}): {text}", transient=True, account_problem=True
        )
    return SendError(f"Stripe refused the meter event ({status}): {text}", transient=False)


@dataclass(frozen=True)
class Target:
    """Where a tenant's usage goes: its Stripe customer and account; None: not billed."""

    customer_id: str | None
    account: billing.StripeAccount | None = None

    def __post_init__(self) -> None:
        if (self.customer_id is None) != (self.account is None):
            raise ValueError("a billed target has both a customer and an account")


@dataclass
class ReportStats:
    batches_reported: int = 0
    batches_unbilled: int = 0
    batches_failed: int = 0
    batches_stale: int = 0
    batches_deferred: int = 0
    events_sent: int = 0
    records_reported: int = 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Reporter:
    """Reports the ledger to Stripe, tenant by tenant."""

    def __init__(
        self,
        ledger: store.LedgerStore,
        sender: Sender,
        *,
        meters: Sequence[Meter] = DEFAULT_METERS,
        attempts: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        bucket_seconds: int = 3600,
        batch_limit: int = 10_000,
        clock: Any = _now,
    ) -> None:
        if not meters:
            raise ValueError("at least one meter")
        self.ledger = ledger
        self.sender = sender
        self.meters = tuple(meters)
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.bucket_seconds = bucket_seconds
        self.batch_limit = batch_limit
        self.clock = clock

    async def report_once(self, targets: Mapping[str, Target]) -> ReportStats:
        """One pass over the tenants named in ``targets`` (others wait)."""
        stats = ReportStats()
        for tenant, target in sorted(targets.items()):
            if target.customer_id is None:
                while made := await self.ledger.reserve(
                    tenant,
                    customer_id=None,
                    bucket_seconds=self.bucket_seconds,
                    limit=self.batch_limit,
                ):
                    stats.batches_unbilled += len(made)
                continue
            await self._report_tenant(tenant, target, stats)
        return stats

    async def _report_tenant(self, tenant: str, target: Target, stats: ReportStats) -> None:
        assert target.account is not None
        while await self.ledger.reserve(
            tenant,
            customer_id=target.customer_id,
            bucket_seconds=self.bucket_seconds,
            limit=self.batch_limit,
        ):
            pass
        for batch in await self.ledger.pending(tenant=tenant):
            if batch.customer_id != target.customer_id:
                # Reserved for a customer the tenant no longer has: report it where the
                # usage happened (the batch's own customer), as reserved.
                log.info("batch %s goes to its own customer %s", batch.batch_id, batch.customer_id)
            outcome = await self._report_batch(batch, target.account)
            if outcome == "reported":
                stats.batches_reported += 1
                stats.records_reported += batch.records
                stats.events_sent += len(events(batch, self.meters))
            elif outcome == "failed":
                stats.batches_failed += 1
            elif outcome == "stale":
                stats.batches_stale += 1
            else:
                stats.batches_deferred += 1
                if outcome == "account":
                    return  # every other batch of this account would fail the same way

    async def _report_batch(
        self, batch: store.Batch, account: billing.StripeAccount
    ) -> Literal["reported", "failed", "stale", "deferred", "account"]:
        now = self.clock()
        if batch.attempts > 0 and now - batch.created_at > STALE_AFTER:
            await self.ledger.mark_attempt(
                batch.batch_id,
                error="tried before and older than Stripe's 24-hour deduplication window: "
                "check Stripe's meter event summaries before resending",
                state="stale",
            )
            log.error(
                "meter batch %s of %s is stale: check it by hand", batch.batch_id, batch.tenant
            )
            return "stale"
        if now - batch.event_time > MAX_EVENT_AGE:
            await self.ledger.mark_attempt(
                batch.batch_id, error="older than the 35 days Stripe accepts", state="failed"
            )
            return "failed"
        for event in events(batch, self.meters):
            try:
                await self._send_with_backoff(account, event)
            except SendError as exc:
                state: store.BatchState | None = None if exc.transient else "failed"
                await self.ledger.mark_attempt(batch.batch_id, error=exc.message, state=state)
                log.warning("meter batch %s of %s: %s", batch.batch_id, batch.tenant, exc.message)
                if exc.account_problem:
                    return "account"
                return "deferred" if exc.transient else "failed"
        await self.ledger.mark_reported(batch.batch_id, at=self.clock())
        return "reported"

    async def _send_with_backoff(self, account: billing.StripeAccount, event: MeterEvent) -> None:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                await self.sender.send(account, event)
                return
            except SendError as exc:
                if not exc.transient or exc.account_problem or attempt == self.attempts:
                    raise
                log.info("meter event %s: %s; retrying in %.1fs", event.identifier, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
