"""Stripe: client construction, error mapping, binding layout."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, stripe_billing
from bmad_integrations import binding as layout

from .policies import OPEN, PUBLIC

pytestmark = pytest.mark.unit

API_KEY = "sk_test_MARKER4f3e2d1c"  # must never show in a message
LOCAL = "http://127.0.0.1:12111"


def block(**fields: Any) -> integration.Stripe:
    return integration.Stripe.model_validate(fields)


def creds(**data: str) -> base.Credentials:
    values = {"apiKey": API_KEY}
    values.update(data)
    return base.Credentials(secret_name="stripe-creds", data=values)


def test_api_base_defaults_to_stripes_public_api() -> None:
    assert stripe_billing.api_base(block()) == "https://api.stripe.com"
    assert stripe_billing.api_base(block(apiBase=LOCAL + "/")) == LOCAL


def test_client_without_a_key_is_secret_key_missing() -> None:
    lacking = base.Credentials(secret_name="stripe-creds", data={"other": "x"})
    with pytest.raises(base.CheckError) as caught:
        stripe_billing.make_client(block(apiBase=LOCAL), lacking, timeout=1, http=httpx.Client())
    assert caught.value.reason == base.Reason.SECRET_KEY_MISSING
    assert "'apiKey'" in caught.value.message


def test_the_key_name_can_be_overridden() -> None:
    custom = base.Credentials(
        secret_name="stripe-creds", data={"sk": API_KEY}, key_names={"api_key": "sk"}
    )
    assert stripe_billing.binding(block(apiBase=LOCAL), custom)["apiKey"] == API_KEY


def error(exc: BaseException) -> base.CheckError:
    return stripe_billing.error_for(exc, block=block(apiBase=LOCAL), creds=creds())


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            stripe.AuthenticationError(f"Invalid API Key provided: {API_KEY}", http_status=401),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (
            stripe.PermissionError("The provided key does not have access", http_status=403),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (stripe.RateLimitError("Too many requests", http_status=429), base.Reason.UNREACHABLE),
        (stripe.APIError("Internal", http_status=500), base.Reason.UNREACHABLE),
        (
            stripe.InvalidRequestError("Unrecognized request URL", None, http_status=404),
            base.Reason.INVALID_CONFIGURATION,
        ),
        (RuntimeError("surprise"), base.Reason.UNREACHABLE),
    ],
)
def test_sdk_errors_map_to_reasons(exc: BaseException, reason: base.Reason) -> None:
    found = error(exc)
    assert found.reason == reason
    assert API_KEY not in found.message


def test_what_stripe_says_is_never_quoted() -> None:
    found = error(
        stripe.AuthenticationError("Invalid API Key provided: sk_test_****", http_status=401)
    )
    assert "Invalid API Key provided" not in found.message
    assert "(401)" in found.message


# --- the whole check, sent through the egress policy ----------------------------------


def run(handler: Any, spec: integration.Stripe, policy: egress.Policy = OPEN) -> base.Checked:
    return stripe_billing.check_sync(
        spec, creds(), timeout=2, policy=policy, transport=httpx.MockTransport(handler)
    )


CUSTOMERS = {"object": "list", "data": [], "has_more": False, "url": "/v1/customers"}


def test_the_sdk_sends_to_the_judged_address_with_the_key() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json=CUSTOMERS, headers={"Stripe-Version": "2025-03-31.basil (INTERNAL)"}
        )

    checked = run(handle, block())
    assert checked.detail == "test mode key accepted"
    assert checked.server_version == "2025-03-31.basil"  # the version, and nothing after it
    assert [(r.method, r.url.host, r.url.path) for r in seen] == [("GET", PUBLIC, "/v1/customers")]
    assert seen[0].headers["Host"] == "api.stripe.com"
    assert seen[0].headers["Authorization"] == f"Bearer {API_KEY}"


def test_a_redirect_is_not_followed() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": "http://10.0.0.1/v1/customers"})

    with pytest.raises(base.CheckError) as caught:
        run(handle, block())
    assert caught.value.reason == base.Reason.INVALID_CONFIGURATION
    assert "redirect" in caught.value.message
    assert "10.0.0.1" not in caught.value.message
    assert len(seen) == 1


def test_an_api_base_resolving_to_a_private_address_is_refused() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("sent")

    policy = egress.Policy(resolver=lambda host, port: ["192.168.1.10"])
    with pytest.raises(base.CheckError) as caught:
        run(handle, block(apiBase="https://stripe.proxy.example.test"), policy)
    assert caught.value.reason == base.Reason.DESTINATION_NOT_ALLOWED
    assert "spec.stripe.apiBase" in caught.value.message


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), base.Reason.UNREACHABLE),
        (httpx.ConnectTimeout("timed out"), base.Reason.TIMEOUT),
        (httpx.ReadTimeout("timed out"), base.Reason.TIMEOUT),
    ],
)
def test_transport_failures_map_to_reasons(exc: Exception, reason: base.Reason) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(base.CheckError) as caught:
        run(handle, block())
    assert caught.value.reason == reason
    assert "api.stripe.com" in caught.value.message


def test_binding_has_the_stripe_layout() -> None:
    data = stripe_billing.binding(block(apiBase=LOCAL), creds(webhookSecret="whsec_abc123"))
    assert layout.problems(data) == []
    assert data == {
        "type": "stripe",
        "provider": "stripe",
        "apiBase": LOCAL,
        "apiKey": API_KEY,
        "webhookSecret": "whsec_abc123",
    }


def test_binding_defaults_the_api_base_and_omits_a_missing_webhook_secret() -> None:
    data = stripe_billing.binding(block(), creds())
    assert data["apiBase"] == "https://api.stripe.com"
    assert "webhookSecret" not in data
