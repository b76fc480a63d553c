"""Stripe billing for tenants: one customer and one subscription each, exactly once.

Exactly once across retries, crashes and restarts rests on three things:
- the ids found or made are kept in the Tenant's status (the reconciler's part);
- before creating, the customer is looked up by the Tenant's uid in its metadata
  (`bmad_tenant_uid`: a Tenant deleted and created again under the same name is a new
  Tenant and gets a new customer), and the subscription is looked up among the
  customer's subscriptions (the Tenant's uid in its metadata, not ended; one to the
  spec's price first, else any: a changed priceId never adds a second subscription);
- every create carries an idempotency key derived from the Tenant's uid (never from
  time or chance), so a create repeated after a crash returns the first result.
Stripe keeps idempotency keys for 24 hours and its customer search lags behind
creates (up to a minute), so each covers the other: the key the moments after a
create, the look-ups any time later. Listing a customer's subscriptions has no lag.
The Stripe SDK is synchronous: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bmad_integrations import base, lazy

if TYPE_CHECKING:
    import stripe
else:  # imported when first used: not every operator bills
    stripe = lazy.module("stripe")

TENANT_METADATA = "bmad_tenant"
TENANT_UID_METADATA = "bmad_tenant_uid"
# Subscriptions in these states are over: a new one is needed.
ENDED = frozenset({"canceled", "incomplete_expired"})


@dataclass(frozen=True)
class StripeAccount:
    api_key: str
    api_base: str | None = None


def customer_key(tenant_uid: str) -> str:
    return f"bmad-tenant-{tenant_uid}-customer"


def subscription_key(tenant_uid: str, price_id: str, ended: int = 0) -> str:
    """The key of the tenant's subscription to a price; ``ended`` counts the tenant's
    subscriptions to that price that are over, so a cancelled subscription is
    replaced by a new one instead of Stripe replaying the cancelled one's creation."""
    base_key = f"bmad-tenant-{tenant_uid}-subscription-{price_id}"
    return base_key if ended == 0 else f"{base_key}-{ended}"


class BillingError(Exception):
    """Stripe refused or could not be reached; `reason` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _client(account: StripeAccount) -> stripe.StripeClient:
    kwargs: dict[str, Any] = {"max_network_retries": 2}
    if account.api_base:
        kwargs["base_addresses"] = {"api": account.api_base}
    return stripe.StripeClient(account.api_key, **kwargs)


def redact(exc: Exception, account: StripeAccount) -> str:
    """What Stripe said, with the API key taken out wherever it is quoted."""
    creds = base.Credentials(secret_name=None, data={"apiKey": account.api_key})
    return creds.redact(str(getattr(exc, "user_message", None) or exc))


def _wrap(exc: Exception, account: StripeAccount) -> BillingError:
    text = redact(exc, account)
    if isinstance(exc, stripe.AuthenticationError):
        return BillingError(
            base.Reason.AUTHENTICATION_FAILED, f"Stripe refused the API key: {text}"
        )
    if isinstance(exc, stripe.APIConnectionError):
        return BillingError(base.Reason.UNREACHABLE, f"Stripe could not be reached: {text}")
    return BillingError("StripeError", text)


def _ensure_customer_sync(
    account: StripeAccount, *, tenant: str, tenant_uid: str, email: str | None, name: str
) -> str:
    client = _client(account)
    try:
        # A uid is a UUID (hex and '-'): nothing in it can break out of the quotes.
        found = client.v1.customers.search(
            params={"query": f"metadata['{TENANT_UID_METADATA}']:'{tenant_uid}'", "limit": 10}
        )
        matching = []
        for customer in found.data:
            data = customer.to_dict()
            if (data.get("metadata") or {}).get(TENANT_UID_METADATA) == tenant_uid:
                matching.append((data.get("created") or 0, str(customer.id)))
        if matching:
            return min(matching)[1]  # the oldest, should an earlier bug have made two
        params: dict[str, Any] = {
            "name": name,
            "metadata": {TENANT_METADATA: tenant, TENANT_UID_METADATA: tenant_uid},
        }
        if email:
            params["email"] = email
        created = client.v1.customers.create(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": customer_key(tenant_uid)},
        )
        return str(created.id)
    except stripe.StripeError as exc:
        raise _wrap(exc, account) from None


def _ensure_subscription_sync(
    account: StripeAccount, *, customer_id: str, price_id: str, tenant: str, tenant_uid: str
) -> str:
    client = _client(account)
    try:
        listed = client.v1.subscriptions.list(
            params={"customer": customer_id, "status": "all", "limit": 100}
        ).data
        existing = find_subscription(listed, tenant_uid=tenant_uid, price_id=price_id)
        if existing is not None:
            return existing
        ended = count_ended(listed, tenant_uid=tenant_uid, price_id=price_id)
        created = client.v1.subscriptions.create(
            params={
                "customer": customer_id,
                "items": [{"price": price_id}],
                "metadata": {TENANT_METADATA: tenant, TENANT_UID_METADATA: tenant_uid},
            },
            options={"idempotency_key": subscription_key(tenant_uid, price_id, ended)},
        )
        return str(created.id)
    except stripe.StripeError as exc:
        raise _wrap(exc, account) from None


def _ours(subscriptions: Iterable[Any], *, tenant_uid: str) -> list[dict[str, Any]]:
    """The subscriptions made for this Tenant (its uid in their metadata)."""
    found = []
    for sub in subscriptions:
        data = sub.to_dict() if hasattr(sub, "to_dict") else dict(sub)
        if (data.get("metadata") or {}).get(TENANT_UID_METADATA) == tenant_uid:
            found.append(data)
    return found


def _has_price(data: dict[str, Any], price_id: str) -> bool:
    items = (data.get("items") or {}).get("data") or []
    return any((item.get("price") or {}).get("id") == price_id for item in items)


def find_subscription(
    subscriptions: Iterable[Any], *, tenant_uid: str, price_id: str
) -> str | None:
    """The Tenant's subscription that has not ended: to this price if there is one,
    else any (a tenant has one live subscription; a new priceId does not add one)."""
    live = [d for d in _ours(subscriptions, tenant_uid=tenant_uid) if d.get("status") not in ENDED]
    ranked = sorted(
        live, key=lambda d: (not _has_price(d, price_id), d.get("created") or 0, str(d["id"]))
    )
    return str(ranked[0]["id"]) if ranked else None


def count_ended(subscriptions: Iterable[Any], *, tenant_uid: str, price_id: str) -> int:
    """How many of the Tenant's subscriptions to this price are over."""
    ours = _ours(subscriptions, tenant_uid=tenant_uid)
    return sum(1 for d in ours if d.get("status") in ENDED and _has_price(d, price_id))


def _cancel_subscription_sync(account: StripeAccount, subscription_id: str) -> None:
    client = _client(account)
    try:
        client.v1.subscriptions.cancel(subscription_id)
    except stripe.InvalidRequestError as exc:
        if getattr(exc, "http_status", None) == 404:
            return  # already gone
        raise _wrap(exc, account) from None
    except stripe.StripeError as exc:
        raise _wrap(exc, account) from None


async def ensure_customer(
    account: StripeAccount, *, tenant: str, tenant_uid: str, email: str | None, name: str
) -> str:
    return await asyncio.to_thread(
        _ensure_customer_sync,
        account,
        tenant=tenant,
        tenant_uid=tenant_uid,
        email=email,
        name=name,
    )


async def ensure_subscription(
    account: StripeAccount, *, customer_id: str, price_id: str, tenant: str, tenant_uid: str
) -> str:
    return await asyncio.to_thread(
        _ensure_subscription_sync,
        account,
        customer_id=customer_id,
        price_id=price_id,
        tenant=tenant,
        tenant_uid=tenant_uid,
    )


async def cancel_subscription(account: StripeAccount, subscription_id: str) -> None:
    await asyncio.to_thread(_cancel_subscription_sync, account, subscription_id)
