"""Stripe: client construction, error mapping, binding layout."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, stripe_billing
from bmad_integrations import binding as layout

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
        stripe_billing.make_client(block(apiBase=LOCAL), lacking, timeout=1)
    assert caught.value.reason == base.Reason.SECRET_KEY_MISSING
    assert "'apiKey'" in caught.value.message


def test_the_key_name_can_be_overridden() -> None:
    custom = base.Credentials(
        secret_name="stripe-creds", data={"sk": API_KEY}, key_names={"api_key": "sk"}
    )
    assert stripe_billing.binding(block(apiBase=LOCAL), custom)["apiKey"] == API_KEY


def error(exc: BaseException) -> base.CheckError:
    return stripe_billing.error_for(exc, block=block(apiBase=LOCAL), creds=creds(), timeout=5)


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
        (
            stripe.APIConnectionError(
                "Unexpected error communicating with Stripe.\n\n"
                "(Network error: ConnectionError: Connection refused)"
            ),
            base.Reason.UNREACHABLE,
        ),
        (
            stripe.APIConnectionError("(Network error: ReadTimeout: read timed out)"),
            base.Reason.TIMEOUT,
        ),
        (
            stripe.APIConnectionError(
                "(Network error: SSLError: [SSL: CERTIFICATE_VERIFY_FAILED])"
            ),
            base.Reason.TLS_ERROR,
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


def test_connection_error_quotes_only_the_network_part() -> None:
    found = error(
        stripe.APIConnectionError(
            "Unexpected error communicating with Stripe. If this problem persists,\n"
            "let us know at support@stripe.com.\n\n(Network error: ConnectionError: refused)"
        )
    )
    assert "support@stripe.com" not in found.message
    assert "ConnectionError: refused" in found.message


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
