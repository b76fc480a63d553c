"""Stripe billing for tenants: one customer and one subscription each, exactly once.

Exactly once across retries, crashes and restarts rests on two things:
- every create carries an idempotency key derived from the Tenant's uid (never from
  time or chance), so a create repeated after a crash returns the first result;
- before creating, the customer is looked up by its `bmad_tenant` metadata, and the
  ids found are kept in the Tenant's status.
The Stripe SDK is synchronous: every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import stripe

from bmad_integrations import base

TENANT_METADATA = "bmad_tenant"


@dataclass(frozen=True)
class StripeAccount:
    api_key: str
    api_base: str | None = None


def customer_key(tenant_uid: str) -> str:
    return f"bmad-tenant-{tenant_uid}-customer"


def subscription_key(tenant_uid: str, price_id: str) -> str:
    return f"bmad-tenant-{tenant_uid}-subscription-{price_id}"


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


def _wrap(exc: Exception, account: StripeAccount) -> BillingError:
    creds = base.Credentials(secret_name=None, data={"apiKey": account.api_key})
    text = creds.redact(str(getattr(exc, "user_message", None) or exc))
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
        found = client.v1.customers.search(
            params={"query": f"metadata['{TENANT_METADATA}']:'{tenant}'", "limit": 10}
        )
        for customer in found.data:
            metadata: dict[str, str] = dict(customer.to_dict().get("metadata") or {})
            if metadata.get(TENANT_METADATA) == tenant:
                return str(customer.id)
        params: dict[str, Any] = {"name": name, "metadata": {TENANT_METADATA: tenant}}
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
        created = client.v1.subscriptions.create(
            params={
                "customer": customer_id,
                "items": [{"price": price_id}],
                "metadata": {TENANT_METADATA: tenant},
            },
            options={"idempotency_key": subscription_key(tenant_uid, price_id)},
        )
        return str(created.id)
    except stripe.StripeError as exc:
        raise _wrap(exc, account) from None


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
