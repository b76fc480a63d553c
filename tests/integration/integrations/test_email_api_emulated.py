"""The SendGrid and Mailgun checks against emulators this project wrote.

The servers are `emulators.sendgrid_router` and `emulators.mailgun_router` behind a
real HTTP server on 127.0.0.1: they answer in the shapes the providers document, but
they are not SendGrid or Mailgun, which the tests may not reach.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, email
from bmad_testbed import procs

from .emulators import HttpServer, mailgun_router, sendgrid_router
from .policies import TESTBED

pytestmark = pytest.mark.integration

API_KEY = "key-MARKER-4e8a1b0c"


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="mail-creds", data=data)


async def failure(block: integration.Email, secrets: base.Credentials) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await email.check(block, secrets, timeout=5, policy=TESTBED)
    assert API_KEY not in caught.value.message
    return caught.value


# --- SendGrid -----------------------------------------------------------------------


@pytest.fixture
def sendgrid() -> Iterator[HttpServer]:
    router = sendgrid_router(api_key=API_KEY, scopes=["mail.send", "user.profile.read"])
    with HttpServer(router) as server:
        yield server


def sendgrid_spec(api_base: str) -> integration.Email:
    return integration.Email.model_validate(
        {"provider": "sendgrid", "apiBase": api_base, "from": "bmad@example.test"}
    )


async def test_sendgrid_with_the_right_key_checks_ready(sendgrid: HttpServer) -> None:
    checked = await email.check(
        sendgrid_spec(sendgrid.url), creds(apiKey=API_KEY), timeout=5, policy=TESTBED
    )
    assert "2 scope(s)" in checked.detail


async def test_sendgrid_with_a_wrong_key_is_authentication_failed(sendgrid: HttpServer) -> None:
    error = await failure(sendgrid_spec(sendgrid.url), creds(apiKey="SG.wrong-key"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(401)" in error.message
    assert "authorization required" not in error.message


async def test_sendgrid_without_a_key_is_secret_key_missing(sendgrid: HttpServer) -> None:
    error = await failure(sendgrid_spec(sendgrid.url), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert sendgrid.requests == []


async def test_sendgrid_on_a_closed_port_is_unreachable() -> None:
    error = await failure(
        sendgrid_spec(f"http://127.0.0.1:{procs.free_port()}"), creds(apiKey=API_KEY)
    )
    assert error.reason is base.Reason.UNREACHABLE


# --- Mailgun ------------------------------------------------------------------------


@pytest.fixture
def mailgun() -> Iterator[HttpServer]:
    with HttpServer(mailgun_router(api_key=API_KEY, domain="mg.bmad.test")) as server:
        yield server


def mailgun_spec(api_base: str, domain: str = "mg.bmad.test") -> integration.Email:
    return integration.Email.model_validate(
        {
            "provider": "mailgun",
            "apiBase": api_base,
            "domain": domain,
            "from": "bmad@mg.bmad.test",
        }
    )


async def test_mailgun_with_the_right_key_checks_ready(mailgun: HttpServer) -> None:
    checked = await email.check(
        mailgun_spec(mailgun.url), creds(apiKey=API_KEY), timeout=5, policy=TESTBED
    )
    assert checked.detail == "Mailgun domain mg.bmad.test (active)"


async def test_mailgun_with_a_wrong_key_is_authentication_failed(mailgun: HttpServer) -> None:
    error = await failure(mailgun_spec(mailgun.url), creds(apiKey="key-wrong"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED


async def test_mailgun_with_an_unknown_domain_is_invalid_configuration(
    mailgun: HttpServer,
) -> None:
    error = await failure(mailgun_spec(mailgun.url, "other.bmad.test"), creds(apiKey=API_KEY))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'other.bmad.test'" in error.message


async def test_mailgun_without_a_key_is_secret_key_missing(mailgun: HttpServer) -> None:
    error = await failure(mailgun_spec(mailgun.url), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING


async def test_mailgun_on_a_closed_port_is_unreachable() -> None:
    error = await failure(
        mailgun_spec(f"http://127.0.0.1:{procs.free_port()}"), creds(apiKey=API_KEY)
    )
    assert error.reason is base.Reason.UNREACHABLE
