"""The SMTP check against real SMTP servers: aiosmtpd started here (plain and STARTTLS)
and the test bed's own aiosmtpd server. SendGrid and Mailgun are checked against
emulators in test_email_api_emulated.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, email
from bmad_testbed import procs

from .emulators import SmtpServer, TlsMaterial, make_tls
from .policies import TESTBED

pytestmark = pytest.mark.integration

USER = "mailer"
PASSWORD = "pw-MARKER-93c1d7"


def smtp_spec(port: int, **fields: Any) -> integration.Email:
    return integration.Email.model_validate(
        {"provider": "smtp", "host": "127.0.0.1", "port": port, "from": "bmad@example.test"}
        | fields
    )


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="mail-creds", data=data)


async def failure(block: integration.Email, secrets: base.Credentials) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await email.check(block, secrets, timeout=5, policy=TESTBED)
    assert PASSWORD not in caught.value.message
    return caught.value


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls(tmp_path_factory.mktemp("smtp-tls"), name="smtp")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls(tmp_path_factory.mktemp("other-tls"), name="other")


@pytest.fixture
def plain_smtp() -> Iterator[SmtpServer]:
    with SmtpServer(username=USER, password=PASSWORD) as server:
        yield server


@pytest.fixture
def starttls_smtp(tls: TlsMaterial) -> Iterator[SmtpServer]:
    with SmtpServer(username=USER, password=PASSWORD, tls=tls) as server:
        yield server


# --- SMTP ---------------------------------------------------------------------------


async def test_smtp_with_the_right_login_checks_ready(plain_smtp: SmtpServer) -> None:
    checked = await email.check(
        smtp_spec(plain_smtp.port),
        creds(username=USER, password=PASSWORD),
        timeout=5,
        policy=TESTBED,
    )
    assert checked.server_version is None  # the greeting is the server's words: not reported
    assert "AUTH" in checked.detail


async def test_smtp_without_a_login_checks_ready(plain_smtp: SmtpServer) -> None:
    checked = await email.check(smtp_spec(plain_smtp.port), creds(), timeout=5, policy=TESTBED)
    assert "AUTH" not in checked.detail


async def test_smtp_with_a_wrong_password_is_authentication_failed(
    plain_smtp: SmtpServer,
) -> None:
    error = await failure(smtp_spec(plain_smtp.port), creds(username=USER, password="pw-wrong-one"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "535" in error.message
    assert "pw-wrong-one" not in error.message


async def test_smtp_with_a_username_but_no_password_is_secret_key_missing(
    plain_smtp: SmtpServer,
) -> None:
    error = await failure(smtp_spec(plain_smtp.port), creds(username=USER))
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert "'password'" in error.message


async def test_smtp_on_a_closed_port_is_unreachable() -> None:
    port = procs.free_port()
    error = await failure(smtp_spec(port), creds())
    assert error.reason is base.Reason.UNREACHABLE
    assert f"127.0.0.1:{port}" in error.message


async def test_starttls_against_a_server_without_it_is_a_tls_error(
    plain_smtp: SmtpServer,
) -> None:
    error = await failure(smtp_spec(plain_smtp.port, startTLS=True), creds())
    assert error.reason is base.Reason.TLS_ERROR
    assert "STARTTLS" in error.message


async def test_starttls_with_the_servers_ca_checks_ready(
    starttls_smtp: SmtpServer, tls: TlsMaterial
) -> None:
    checked = await email.check(
        smtp_spec(starttls_smtp.port, startTLS=True),
        creds(username=USER, password=PASSWORD, **{"ca.crt": tls.ca_pem}),
        timeout=5,
        policy=TESTBED,
    )
    assert "STARTTLS, AUTH" in checked.detail


async def test_starttls_with_a_wrong_password_is_authentication_failed(
    starttls_smtp: SmtpServer, tls: TlsMaterial
) -> None:
    error = await failure(
        smtp_spec(starttls_smtp.port, startTLS=True),
        creds(username=USER, password="pw-wrong-one", **{"ca.crt": tls.ca_pem}),
    )
    assert error.reason is base.Reason.AUTHENTICATION_FAILED


@pytest.mark.parametrize("trust", ["other", "system"])
async def test_starttls_with_the_wrong_ca_is_a_tls_error(
    starttls_smtp: SmtpServer, other_ca: TlsMaterial, trust: str
) -> None:
    data = {"ca.crt": other_ca.ca_pem} if trust == "other" else {}
    error = await failure(
        smtp_spec(starttls_smtp.port, startTLS=True),
        creds(username=USER, password=PASSWORD, **data),
    )
    assert error.reason is base.Reason.TLS_ERROR
    assert "'ca.crt'" in error.message


async def test_auth_without_starttls_where_the_server_requires_it_says_so(
    starttls_smtp: SmtpServer,
) -> None:
    error = await failure(smtp_spec(starttls_smtp.port), creds(username=USER, password=PASSWORD))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.email.startTLS" in error.message


async def test_the_test_beds_smtp_server_checks_ready(smtp: dict[str, str]) -> None:
    block = integration.Email.model_validate(
        {
            "provider": "smtp",
            "host": smtp["host"],
            "port": int(smtp["port"]),
            "from": "bmad@example.test",
        }
    )
    checked = await email.check(block, creds(), timeout=5, policy=TESTBED)
    assert checked.detail == f"SMTP server {smtp['host']}:{smtp['port']} accepted EHLO and NOOP"
