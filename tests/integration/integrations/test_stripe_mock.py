"""The stripe check against the test bed's stripe-mock: Stripe's own mock of its API,
not the live Stripe API.

What stripe-mock refuses (found by asking it; it keeps no account, so no key is
"wrong" in the real sense): any Authorization that is not a valid-looking *test-mode
secret* key. ``sk_test_…`` and ``rk_test_…`` are accepted whatever follows the
prefix; a missing header, a live-mode key (``sk_live_…``), a publishable key
(``pk_test_…``), a key with a space in it, or anything without a known prefix gets
401 "Please authenticate … with any valid looking testmode secret API key … Authorization
was 'Bearer <the key>'" — the key echoed back, which the check must redact.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks
from bmad_testbed import procs

from .policies import TESTBED

pytestmark = pytest.mark.integration


def stripe_spec(api_base: str, **ref: Any) -> integration.IntegrationSpec:
    return integration.IntegrationSpec.model_validate(
        {
            "type": "stripe",
            "secretRef": {"name": "stripe-creds", **ref},
            "stripe": {"apiBase": api_base},
        }
    )


@pytest.mark.parametrize("key", ["sk_test_123", "rk_test_restricted42"])
async def test_a_test_mode_secret_key_is_checked(stripe_api_base: str, key: str) -> None:
    result = await checks.check_integration(
        stripe_spec(stripe_api_base), {"apiKey": key.encode()}, secret_found=True, policy=TESTBED
    )
    assert result.ok, result.message
    assert result.reason == base.Reason.CHECKED
    assert "test mode" in result.message
    assert (result.server_version or "").startswith("stripe-mock")  # its Stripe-Mock-Version
    assert key not in result.message


@pytest.mark.parametrize(
    "key", ["sk_live_LIVEKEY123", "pk_test_PUBLISHABLE1", "not-a-stripe-key", "sk_test_ spaced"]
)
async def test_keys_stripe_mock_refuses_are_authentication_failed(
    stripe_api_base: str, key: str
) -> None:
    result = await checks.check_integration(
        stripe_spec(stripe_api_base), {"apiKey": key.encode()}, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED, result.message
    assert key not in result.message  # stripe-mock echoes the key; the check redacts it
    assert "'apiKey'" in result.message


async def test_the_key_name_can_be_overridden(stripe_api_base: str) -> None:
    result = await checks.check_integration(
        stripe_spec(stripe_api_base, keys={"apiKey": "STRIPE_SECRET_KEY"}),
        {"STRIPE_SECRET_KEY": b"sk_test_123"},
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message


async def test_a_closed_port_is_unreachable() -> None:
    api_base = f"http://127.0.0.1:{procs.free_port()}"
    result = await checks.check_integration(
        stripe_spec(api_base), {"apiKey": b"sk_test_123"}, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.UNREACHABLE
    assert api_base in result.message
    assert "support@stripe.com" not in result.message


async def test_a_missing_key_is_secret_key_missing(stripe_api_base: str) -> None:
    result = await checks.check_integration(
        stripe_spec(stripe_api_base),
        {"webhookSecret": b"whsec_1"},
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.SECRET_KEY_MISSING
    assert "'apiKey'" in result.message


async def test_a_missing_secret_is_secret_not_found(stripe_api_base: str) -> None:
    result = await checks.check_integration(
        stripe_spec(stripe_api_base), None, secret_found=False, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_NOT_FOUND
    assert "'stripe-creds'" in result.message
    assert "'apiKey'" in result.message


async def test_the_sdk_does_not_log_a_refused_key(
    stripe_api_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The SDK logs each API error's message at INFO, and stripe-mock's quotes the key.
    key = "sk_live_MARKERlogged77"
    with caplog.at_level(logging.DEBUG):
        result = await checks.check_integration(
            stripe_spec(stripe_api_base),
            {"apiKey": key.encode()},
            secret_found=True,
            policy=TESTBED,
        )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED
    assert key not in caplog.text
