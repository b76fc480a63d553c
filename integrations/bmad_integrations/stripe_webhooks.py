"""Stripe webhooks: signature check, the events billing acts on, each event once.

`verify` checks the ``Stripe-Signature`` header the way Stripe specifies it: the
header holds a timestamp ``t`` and one or more ``v1`` signatures, each an HMAC-SHA256
of ``"<t>.<raw body>"`` keyed with the endpoint's signing secret (``whsec_…``). A
request is accepted when one ``v1`` matches one of our secrets (several during a
rotation), compared in constant time, and ``t`` is within `TOLERANCE` seconds of now
(so a captured request cannot be replayed later). Anything else is refused before
the body is even parsed.

`PaymentInbox` records each event id once, in the platform PostgreSQL, in the same
transaction that applies the event to the customer's payment state
(``stripe_payment_state``): a delivery repeated by Stripe (it retries until it gets a
2xx) or replayed by an attacker with a valid old signature changes nothing, and a
crash before the commit leaves nothing behind, so Stripe's retry is processed. What
the state means for a Tenant (conditions, suspension after a grace period) is the
operator's pure policy; this module only keeps the facts, in event time: Stripe does
not deliver in order, so an older event never overrides a newer one.

`handle` is the endpoint without a web framework (body and header in, status and JSON
out); `aiohttp_handler` mounts it on an aiohttp application.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

TOLERANCE = 300
SIGNATURE_HEADER = "Stripe-Signature"
MAX_BODY_BYTES = 512 * 1024

PAYMENT_FAILED = "invoice.payment_failed"
PAID = "invoice.paid"
SUBSCRIPTION_DELETED = "customer.subscription.deleted"
SUBSCRIPTION_UPDATED = "customer.subscription.updated"
HANDLED = frozenset({PAYMENT_FAILED, PAID, SUBSCRIPTION_DELETED, SUBSCRIPTION_UPDATED})


class WebhookError(Exception):
    """A request refused with 400; ``code`` is machine-readable, the message is ours."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``v1`` signature of a payload at a time: hex HMAC-SHA256 of ``t.payload``."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def _parse_header(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookError(
                    "bad_signature", "the signature's timestamp is not a number"
                ) from None
        elif key == "v1":
            signatures.append(value)
    if timestamp is None:
        raise WebhookError("bad_signature", "the signature header has no timestamp (t=)")
    if not signatures:
        raise WebhookError("bad_signature", "the signature header has no v1 signature")
    return timestamp, signatures


def verify(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance: int = TOLERANCE,
) -> None:
    """Raise `WebhookError` unless the header signs this payload, recently, with a secret."""
    if not secrets:
        raise WebhookError("not_configured", "no webhook signing secret is configured")
    if not header:
        raise WebhookError("bad_signature", f"the {SIGNATURE_HEADER} header is missing")
    timestamp, given = _parse_header(header)
    matched = False
    for secret in secrets:
        expected = signature(payload, secret, timestamp)
        for candidate in given:
            # Every comparison runs, in constant time: timing tells nothing.
            matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise WebhookError("bad_signature", "no signature matches the webhook secret")
    if abs(now - timestamp) > tolerance:
        raise WebhookError(
            "stale_signature",
            f"the signature is {abs(int(now) - timestamp)} s away from now "
            f"(at most {tolerance} s are accepted)",
        )


@dataclass(frozen=True)
class PaymentEvent:
    """The part of a Stripe event that billing acts on."""

    event_id: str
    type: str
    created: dt.datetime
    customer_id: str | None
    subscription_id: str | None = None
    subscription_status: str | None = None


def parse(payload: bytes) -> PaymentEvent:
    """The event of a (verified) payload; `WebhookError` if it is not a Stripe event."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise WebhookError("invalid_payload", "the body is not JSON") from None
    if not isinstance(data, dict) or data.get("object") != "event":
        raise WebhookError("invalid_payload", "the body is not a Stripe event")
    event_id, kind, created = data.get("id"), data.get("type"), data.get("created")
    obj = (data.get("data") or {}).get("object")
    if (
        not isinstance(event_id, str)
        or not isinstance(kind, str)
        or not isinstance(created, int)
        or not isinstance(obj, dict)
    ):
        raise WebhookError("invalid_payload", "the event lacks id, type, created or data.object")
    customer = obj.get("customer")
    subscription_id = status = None
    if kind.startswith("customer.subscription."):
        subscription_id = obj.get("id")
        status = "canceled" if kind == SUBSCRIPTION_DELETED else obj.get("status")
    elif kind.startswith("invoice."):
        sub = obj.get("subscription")
        if sub is None:  # newer API versions moved it under parent.subscription_details
            details = (obj.get("parent") or {}).get("subscription_details") or {}
            sub = details.get("subscription")
        subscription_id = sub if isinstance(sub, str) else None
    return PaymentEvent(
        event_id=event_id,
        type=kind,
        created=dt.datetime.fromtimestamp(created, dt.UTC),
        customer_id=customer if isinstance(customer, str) else None,
        subscription_id=subscription_id if isinstance(subscription_id, str) else None,
        subscription_status=status if isinstance(status, str) else None,
    )


@dataclass(frozen=True)
class PaymentState:
    """What the webhooks said about one Stripe customer, in event time."""

    customer_id: str
    failed_since: dt.datetime | None = None
    last_failure_at: dt.datetime | None = None
    last_paid_at: dt.datetime | None = None
    subscription_id: str | None = None
    subscription_status: str | None = None
    subscription_status_at: dt.datetime | None = None


def _later(a: dt.datetime | None, b: dt.datetime) -> dt.datetime:
    return b if a is None or b > a else a


def apply(state: PaymentState, event: PaymentEvent) -> PaymentState:
    """The state after one event; events may come in any order (pure)."""
    at = event.created
    if event.type == PAYMENT_FAILED:
        if state.last_paid_at is not None and at <= state.last_paid_at:
            # A failure older than a payment we know of: that invoice was paid since.
            return dataclasses.replace(state, last_failure_at=_later(state.last_failure_at, at))
        failed_since = at if state.failed_since is None else min(state.failed_since, at)
        return dataclasses.replace(
            state, failed_since=failed_since, last_failure_at=_later(state.last_failure_at, at)
        )
    if event.type == PAID:
        cleared = state.last_failure_at is None or at >= state.last_failure_at
        return dataclasses.replace(
            state,
            last_paid_at=_later(state.last_paid_at, at),
            failed_since=None if cleared else state.failed_since,
        )
    if event.type in (SUBSCRIPTION_UPDATED, SUBSCRIPTION_DELETED):
        if state.subscription_status_at is not None and at < state.subscription_status_at:
            return state
        return dataclasses.replace(
            state,
            subscription_id=event.subscription_id or state.subscription_id,
            subscription_status=event.subscription_status or state.subscription_status,
            subscription_status_at=at,
        )
    return state


class Inbox(Protocol):
    async def receive(self, event: PaymentEvent) -> bool:
        """Record and apply an event; False when its id was seen before."""
        ...


_CLAIM = """
INSERT INTO stripe_webhook_events (event_id, type, customer_id, created)
VALUES ($1, $2, $3, $4)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""
_ENSURE_STATE = """
INSERT INTO stripe_payment_state (customer_id) VALUES ($1)
ON CONFLICT (customer_id) DO NOTHING
"""
_STATE_COLUMNS = """customer_id, failed_since, last_failure_at, last_paid_at, subscription_id,
    subscription_status, subscription_status_at"""
_LOCK_STATE = f"SELECT {_STATE_COLUMNS} FROM stripe_payment_state WHERE customer_id = $1 FOR UPDATE"  # noqa: S608 - constant columns
_GET_STATES = (
    f"SELECT {_STATE_COLUMNS} FROM stripe_payment_state WHERE customer_id = ANY($1::text[])"  # noqa: S608
)
_SAVE_STATE = """
UPDATE stripe_payment_state
SET failed_since = $2, last_failure_at = $3, last_paid_at = $4, subscription_id = $5,
    subscription_status = $6, subscription_status_at = $7, updated_at = now()
WHERE customer_id = $1
"""


def _state(row: Any) -> PaymentState:
    return PaymentState(**{key: row[key] for key in row.keys()})  # noqa: SIM118 - a Record


class PaymentInbox:
    """The webhook inbox and payment states, in the ledger's database."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def receive(self, event: PaymentEvent) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                _CLAIM, event.event_id, event.type, event.customer_id, event.created
            )
            if claimed is None:
                return False
            if event.type not in HANDLED or event.customer_id is None:
                return True
            await conn.execute(_ENSURE_STATE, event.customer_id)
            current = _state(await conn.fetchrow(_LOCK_STATE, event.customer_id))
            updated = apply(current, event)
            if updated != current:
                await conn.execute(
                    _SAVE_STATE,
                    updated.customer_id,
                    updated.failed_since,
                    updated.last_failure_at,
                    updated.last_paid_at,
                    updated.subscription_id,
                    updated.subscription_status,
                    updated.subscription_status_at,
                )
        return True

    async def states(self, customer_ids: Sequence[str]) -> dict[str, PaymentState]:
        """The payment state of each customer that has one."""
        rows = await self.pool.fetch(_GET_STATES, list(customer_ids))
        return {row["customer_id"]: _state(row) for row in rows}


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]


async def handle(
    payload: bytes,
    header: str | None,
    *,
    secrets: Sequence[str],
    inbox: Inbox,
    now: float | None = None,
) -> Response:
    """The endpoint: 400 and no change for a bad request, 200 once recorded.

    A failure to record (the database is down) is a 503, so Stripe delivers again.
    """
    if len(payload) > MAX_BODY_BYTES:
        return Response(413, {"error": {"code": "too_large", "message": "the body is too large"}})
    try:
        verify(payload, header, secrets, now=time.time() if now is None else now)
        event = parse(payload)
    except WebhookError as exc:
        log.warning("Stripe webhook refused: %s", exc.message)
        return Response(400, {"error": {"code": exc.code, "message": exc.message}})
    try:
        fresh = await inbox.receive(event)
    except Exception as exc:  # the database: let Stripe retry
        log.warning("Stripe webhook %s not recorded: %s", event.event_id, type(exc).__name__)
        return Response(
            503, {"error": {"code": "unavailable", "message": "not recorded, retry later"}}
        )
    return Response(200, {"received": True, "duplicate": not fresh, "id": event.event_id})


SecretSource = Callable[[], Sequence[str]]


def aiohttp_handler(*, secrets: SecretSource, inbox: Inbox) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp request handler for the endpoint (secrets read on every request)."""
    from aiohttp import web

    async def endpoint(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.json_response(
                {"error": {"code": "too_large", "message": "the body is too large"}}, status=413
            )
        payload = await request.read()
        answer = await handle(
            payload, request.headers.get(SIGNATURE_HEADER), secrets=secrets(), inbox=inbox
        )
        return web.json_response(answer.body, status=answer.status)

    return endpoint
