"""Stripe, through the official SDK: one cheap authenticated read with the tenant key.

Named ``stripe_billing`` so that it never shadows the ``stripe`` package. The SDK is
synchronous, so the call runs in a worker thread with the SDK's own network retries
switched off and an HTTP timeout of the check's length. The read is "list customers,
limit 1": the operator creates customers for Tenants, so a restricted key must be
allowed this anyway.
"""

from __future__ import annotations

import asyncio
import logging

import stripe

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base

PROVIDER = "stripe"
DEFAULT_API_BASE = "https://api.stripe.com"


def api_base(block: integration.Stripe) -> str:
    return (block.api_base or DEFAULT_API_BASE).rstrip("/")


def quiet_sdk_logger() -> None:
    """Keep the SDK's INFO/DEBUG records out of the operator's log.

    The SDK logs every API error's message at INFO ("Stripe v1 API error received …"),
    and an authentication error's message quotes the Authorization header, key and
    all; DEBUG records hold whole request and response bodies. A level set on the
    ``stripe`` logger on purpose is left alone.
    """
    sdk_logger = logging.getLogger("stripe")
    if sdk_logger.level == logging.NOTSET:
        sdk_logger.setLevel(logging.WARNING)


def make_client(
    block: integration.Stripe, creds: base.Credentials, *, timeout: float
) -> stripe.StripeClient:
    quiet_sdk_logger()
    return stripe.StripeClient(
        creds.require("api_key"),
        base_addresses={"api": api_base(block)},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


def error_for(
    exc: BaseException, *, block: integration.Stripe, creds: base.Credentials, timeout: float
) -> base.CheckError:
    """The CheckError for anything the SDK raised during the check."""
    if isinstance(exc, base.CheckError):
        return exc
    where = api_base(block)
    detail = base.said(exc, creds)
    key = creds.key("api_key")
    if isinstance(exc, stripe.AuthenticationError):
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Stripe at {where} refused the API key ({detail}): put a valid secret key "
            f"(sk_…) or restricted key (rk_…) in key {key!r} of the credentials Secret",
        )
    if isinstance(exc, stripe.PermissionError):
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Stripe at {where} denied the API key access to customers ({detail}): give the "
            "restricted key write access to Customers and Subscriptions",
        )
    if isinstance(exc, stripe.APIConnectionError):
        text = str(exc)
        if "SSL" in text or "certificate" in text:
            return base.CheckError(
                base.Reason.TLS_ERROR,
                f"TLS with Stripe at {where} failed ({detail}): check spec.stripe.apiBase",
            )
        if "timed out" in text.lower() or "timeout" in text.lower():
            return base.CheckError(
                base.Reason.TIMEOUT,
                f"Stripe at {where} did not answer within {timeout:g}s: check "
                "spec.stripe.apiBase and that the network lets the operator reach it",
            )
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"cannot connect to Stripe at {where} ({base.said(_network_part(text), creds)}): check "
            "spec.stripe.apiBase and that the network lets the operator reach it",
        )
    if isinstance(exc, stripe.RateLimitError):
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"Stripe at {where} is rate-limiting the key ({detail}); the check is retried",
        )
    if isinstance(exc, stripe.StripeError):
        status = exc.http_status
        if status is not None and status >= 500:
            return base.CheckError(
                base.Reason.UNREACHABLE,
                f"Stripe at {where} answered {status} ({detail}); the check is retried",
            )
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Stripe at {where} refused the check's request ({detail}): check "
            "spec.stripe.apiBase points at the Stripe API",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach Stripe at {where} ({type(exc).__name__}: {detail}): check "
        "spec.stripe.apiBase",
    )


def _network_part(text: str) -> str:
    # The SDK's connection errors open with a paragraph of boilerplate, then say
    # "(Network error: <what happened>)".
    marker = "(Network error:"
    if marker not in text:
        return text
    return text[text.index(marker) + len(marker) :].strip().removesuffix(")")


def check_sync(
    block: integration.Stripe, creds: base.Credentials, *, timeout: float
) -> base.Checked:
    """The check, blocking: run it in a worker thread."""
    try:
        client = make_client(block, creds, timeout=timeout)
        page = client.v1.customers.list(params={"limit": 1})
    except Exception as exc:
        raise error_for(exc, block=block, creds=creds, timeout=timeout) from None
    mode = "live" if getattr(page, "livemode", False) else "test"
    version = _api_version(page)
    return base.Checked(server_version=version, detail=f"{mode} mode key accepted")


def _api_version(obj: object) -> str | None:
    """The API version Stripe answered in (its Stripe-Version header), when it says."""
    response = getattr(obj, "last_response", None)
    headers = {
        str(k).lower(): str(v) for k, v in (getattr(response, "headers", None) or {}).items()
    }
    if headers.get("stripe-version"):
        return headers["stripe-version"]
    if headers.get("stripe-mock-version"):
        return f"stripe-mock {headers['stripe-mock-version']}"
    return None


async def check(
    block: integration.Stripe,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds the HTTP exchange, not the coroutine
) -> base.Checked:
    """List one customer with the key: proves the key, the mode and the API base."""
    return await asyncio.to_thread(check_sync, block, creds, timeout=timeout)


def binding(block: integration.Stripe, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: the API key, the API base, the webhook secret if any."""
    data = {
        "type": "stripe",
        "provider": PROVIDER,
        "apiBase": api_base(block),
        "apiKey": creds.require("api_key"),
    }
    webhook_secret = creds.get("webhook_secret")
    if webhook_secret:
        data["webhookSecret"] = webhook_secret
    return data
