"""Stripe, through the official SDK: one cheap authenticated read with the tenant key.

Named ``stripe_billing`` so that it never shadows the ``stripe`` package. The SDK is
synchronous, so the call runs in a worker thread with the SDK's own network retries
switched off; its HTTP goes through httpx and the egress policy (`_HttpClient`), with
a timeout of the check's length. The read is "list customers, limit 1": the operator
creates customers for Tenants, so a restricted key must be allowed this anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import stripe

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, httpcheck, lazy

if TYPE_CHECKING:
    import httpx
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")

PROVIDER = "stripe"
DEFAULT_API_BASE = "https://api.stripe.com"
API_BASE_FIELD = "spec.stripe.apiBase"


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


class _HttpClient(stripe.HTTPClient):
    """The SDK's transport, replaced: requests go through httpx and the egress policy.

    The SDK's own clients (requests, urllib) resolve and connect on their own and
    follow redirects; this one sends each request to the address the policy judged,
    follows nothing, and reports a failed connection as the check's own error.
    """

    name = "bmad-egress"

    def __init__(self, http: httpx.Client, *, creds: base.Credentials, timeout: float) -> None:
        super().__init__()
        self._http = http
        self._creds = creds
        self._timeout = timeout

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[str, int, Mapping[str, str]]:
        try:
            response = self._http.request(method, url, headers=headers, content=post_data)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise httpcheck.transport_error(
                exc, service="Stripe", url=url, timeout=self._timeout, creds=self._creds
            ) from None
        return response.text, response.status_code, response.headers

    def close(self) -> None:
        """The httpx client belongs to the check, which closes it."""


def make_client(
    block: integration.Stripe, creds: base.Credentials, *, timeout: float, http: httpx.Client
) -> stripe.StripeClient:
    quiet_sdk_logger()
    return stripe.StripeClient(
        creds.require("api_key"),
        base_addresses={"api": api_base(block)},
        max_network_retries=0,
        http_client=_HttpClient(http, creds=creds, timeout=timeout),
    )


def error_for(
    exc: BaseException, *, block: integration.Stripe, creds: base.Credentials
) -> base.CheckError:
    """The CheckError for anything the SDK raised during the check.

    The kind of error (the HTTP status behind it) decides the message; what Stripe
    said never appears (an authentication error's message quotes the key).
    """
    if isinstance(exc, base.CheckError):
        return exc
    where = api_base(block)
    key = creds.key("api_key")
    status = exc.http_status if isinstance(exc, stripe.StripeError) else None
    if isinstance(exc, stripe.AuthenticationError):
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Stripe at {where} refused the API key ({status}): put a valid secret key "
            f"(sk_…) or restricted key (rk_…) in key {key!r} of the credentials Secret",
        )
    if isinstance(exc, stripe.PermissionError):
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Stripe at {where} denied the API key access to customers ({status}): give the "
            "restricted key write access to Customers and Subscriptions",
        )
    if isinstance(exc, stripe.RateLimitError) or (status is not None and status >= 500):
        return base.CheckError(
            base.Reason.UNREACHABLE, f"Stripe at {where} answered {status}; the check is retried"
        )
    if status is not None and 300 <= status < 400:
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Stripe at {where} answered {status}, a redirect, which checks do not follow: "
            "check spec.stripe.apiBase points at the Stripe API",
        )
    if isinstance(exc, stripe.StripeError):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Stripe at {where} refused the check's request"
            + (f" ({status})" if status else "")
            + ": check spec.stripe.apiBase points at the Stripe API",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach Stripe at {where} ({type(exc).__name__}): check spec.stripe.apiBase",
    )


def check_sync(
    block: integration.Stripe,
    creds: base.Credentials,
    *,
    timeout: float,
    policy: egress.Policy,
    transport: httpx.BaseTransport | None = None,
) -> base.Checked:
    """The check, blocking: run it in a worker thread. `transport` replaces the network
    (tests); the egress policy still applies."""
    httpcheck.check_base_url(api_base(block), field=API_BASE_FIELD)
    with httpcheck.sync_client(
        timeout=timeout, policy=policy, field=API_BASE_FIELD, transport=transport
    ) as http:
        try:
            client = make_client(block, creds, timeout=timeout, http=http)
            page = client.v1.customers.list(params={"limit": 1})
        except Exception as exc:
            raise error_for(exc, block=block, creds=creds) from None
    mode = "live" if getattr(page, "livemode", False) else "test"
    return base.Checked(server_version=_api_version(page), detail=f"{mode} mode key accepted")


def _api_version(obj: object) -> str | None:
    """The API version Stripe answered in (its Stripe-Version header), when it says."""
    response = getattr(obj, "last_response", None)
    headers = {
        str(k).lower(): str(v) for k, v in (getattr(response, "headers", None) or {}).items()
    }
    if headers.get("stripe-version"):
        return base.version(headers["stripe-version"])
    if "stripe-mock-version" not in headers:
        return None
    mock = base.version(headers["stripe-mock-version"])  # a build from source says "master"
    return f"stripe-mock {mock}" if mock else "stripe-mock"


async def check(
    block: integration.Stripe,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds the HTTP exchange, not the coroutine
    policy: egress.Policy,
) -> base.Checked:
    """List one customer with the key: proves the key, the mode and the API base."""
    return await asyncio.to_thread(check_sync, block, creds, timeout=timeout, policy=policy)


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
