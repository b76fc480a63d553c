from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, email
from bmad_integrations import binding as layout

from .policies import OPEN, PUBLIC, as_named

pytestmark = pytest.mark.unit

API_KEY = "SG.MARKER-key-5e1d9c"  # must never show in a message
PASSWORD = "pw-MARKER-0a8f"

Handler = Callable[[httpx.Request], httpx.Response]


def block(provider: str, **fields: Any) -> integration.Email:
    spec: dict[str, Any] = {"provider": provider, "from": "noreply@example.test"}
    spec.update(fields)
    return integration.Email.model_validate(spec)


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="mail-creds", data=data)


async def run(
    handler: Handler, spec: integration.Email, secrets: base.Credentials | None = None
) -> base.Checked:
    return await email.check(
        spec,
        secrets or creds(apiKey=API_KEY),
        timeout=5,
        policy=OPEN,
        transport=httpx.MockTransport(handler),
    )


async def fails(
    handler: Handler, spec: integration.Email, secrets: base.Credentials | None = None
) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await run(handler, spec, secrets)
    assert API_KEY not in caught.value.message
    assert PASSWORD not in caught.value.message
    return caught.value


def sendgrid(
    status: int = 200, body: Any = None, seen: list[httpx.Request] | None = None
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if body is None:
            return httpx.Response(status, json={"scopes": ["mail.send", "user.profile.read"]})
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    return handle


# --- SendGrid -----------------------------------------------------------------------


async def test_sendgrid_checks_the_keys_scopes_with_a_bearer_token() -> None:
    seen: list[httpx.Request] = []
    checked = await run(sendgrid(seen=seen), block("sendgrid"))
    assert as_named(seen[0]) == "https://api.sendgrid.com/v3/scopes"
    assert seen[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert "2 scope(s)" in checked.detail


async def test_sendgrid_honours_the_api_base() -> None:
    seen: list[httpx.Request] = []
    await run(sendgrid(seen=seen), block("sendgrid", apiBase="https://sg.proxy.test/"))
    assert as_named(seen[0]) == "https://sg.proxy.test/v3/scopes"


@pytest.mark.parametrize("status", [401, 403])
async def test_sendgrid_refusing_the_key_is_authentication_failed(status: int) -> None:
    body = {"errors": [{"field": None, "message": "authorization required"}]}
    error = await fails(sendgrid(status, body), block("sendgrid"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert f"({status})" in error.message
    assert "authorization required" not in error.message  # SendGrid's words, not quoted
    assert "'apiKey'" in error.message


async def test_sendgrid_key_without_mail_send_is_invalid_configuration() -> None:
    error = await fails(sendgrid(body={"scopes": ["user.profile.read"]}), block("sendgrid"))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "mail.send" in error.message


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, b"oops", base.Reason.UNREACHABLE),
        (429, {"errors": [{"message": "too many requests"}]}, base.Reason.UNREACHABLE),
        (404, b"not found", base.Reason.INVALID_CONFIGURATION),
        (200, b"<html/>", base.Reason.INVALID_CONFIGURATION),
    ],
)
async def test_sendgrid_other_answers_map_to_reasons(
    status: int, body: Any, reason: base.Reason
) -> None:
    error = await fails(sendgrid(status, body), block("sendgrid"))
    assert error.reason is reason
    if reason is base.Reason.UNREACHABLE:
        assert str(status) in error.message


async def test_sendgrid_without_the_key_is_secret_key_missing() -> None:
    error = await fails(sendgrid(), block("sendgrid"), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert "'apiKey'" in error.message


async def test_sendgrid_without_any_secret_is_invalid_configuration() -> None:
    error = await fails(sendgrid(), block("sendgrid"), base.Credentials(secret_name=None))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.secretRef" in error.message


async def test_what_the_server_says_is_never_quoted() -> None:
    error = await fails(
        sendgrid(500, {"errors": [{"message": f"bad key {API_KEY}"}]}), block("sendgrid")
    )
    assert error.reason is base.Reason.UNREACHABLE
    assert "bad key" not in error.message


async def test_an_api_base_with_a_query_is_refused_before_any_request() -> None:
    seen: list[httpx.Request] = []
    error = await fails(sendgrid(seen=seen), block("sendgrid", apiBase="https://sg.test/?a="))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.email.apiBase" in error.message
    assert seen == []


def _raising(exc: Exception) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return handle


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), base.Reason.UNREACHABLE),
        (httpx.ConnectTimeout("timed out"), base.Reason.TIMEOUT),
        (httpx.ReadTimeout("timed out"), base.Reason.TIMEOUT),
    ],
)
async def test_sendgrid_transport_failures_map_to_reasons(
    exc: Exception, reason: base.Reason
) -> None:
    error = await fails(_raising(exc), block("sendgrid"))
    assert error.reason is reason
    assert "api.sendgrid.com" in error.message


# --- Mailgun ------------------------------------------------------------------------


def mailgun(
    status: int = 200, body: Any = None, seen: list[httpx.Request] | None = None
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if body is None:
            return httpx.Response(
                status, json={"domain": {"name": "mg.example.test", "state": "active"}}
            )
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    return handle


async def test_mailgun_reads_the_domain_with_basic_auth() -> None:
    seen: list[httpx.Request] = []
    checked = await run(mailgun(seen=seen), block("mailgun", domain="mg.example.test"))
    assert as_named(seen[0]) == "https://api.mailgun.net/v3/domains/mg.example.test"
    expected = base64.b64encode(f"api:{API_KEY}".encode()).decode()
    assert seen[0].headers["Authorization"] == f"Basic {expected}"
    assert checked.detail == "Mailgun domain mg.example.test (active)"


async def test_a_domain_state_mailgun_does_not_document_is_not_shown() -> None:
    record = {"domain": {"name": "mg.example.test", "state": "INTERNAL-words"}}
    checked = await run(mailgun(body=record), block("mailgun", domain="mg.example.test"))
    assert checked.detail == "Mailgun domain mg.example.test"


async def test_mailgun_honours_the_eu_api_base() -> None:
    seen: list[httpx.Request] = []
    spec = block("mailgun", domain="mg.example.test", apiBase="https://api.eu.mailgun.net")
    await run(mailgun(seen=seen), spec)
    assert as_named(seen[0]) == "https://api.eu.mailgun.net/v3/domains/mg.example.test"


@pytest.mark.parametrize("status", [401, 403])
async def test_mailgun_forbidden_is_authentication_failed(status: int) -> None:
    error = await fails(mailgun(status, b"Forbidden"), block("mailgun", domain="mg.example.test"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "'apiKey'" in error.message


async def test_mailgun_unknown_domain_is_invalid_configuration() -> None:
    error = await fails(
        mailgun(404, {"message": "Domain not found"}), block("mailgun", domain="mg.example.test")
    )
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'mg.example.test'" in error.message
    assert "spec.email.domain" in error.message


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (502, b"bad gateway", base.Reason.UNREACHABLE),
        (200, {"items": []}, base.Reason.INVALID_CONFIGURATION),
        (400, {"message": "bad"}, base.Reason.INVALID_CONFIGURATION),
    ],
)
async def test_mailgun_other_answers_map_to_reasons(
    status: int, body: Any, reason: base.Reason
) -> None:
    error = await fails(mailgun(status, body), block("mailgun", domain="mg.example.test"))
    assert error.reason is reason


async def test_mailgun_without_a_domain_is_invalid_configuration() -> None:
    spec = integration.Email.model_construct(
        provider="mailgun", from_="noreply@example.test", domain=None, api_base=None
    )
    error = await fails(mailgun(), spec)
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.email.domain" in error.message


# --- SMTP, the parts that need no server ----------------------------------------------


async def test_smtp_without_host_is_invalid_configuration() -> None:
    spec = integration.Email.model_construct(
        provider="smtp", from_="noreply@example.test", host=None, port=None, start_tls=False
    )
    with pytest.raises(base.CheckError) as caught:
        await email.check(spec, creds(), timeout=1, policy=OPEN)
    assert caught.value.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.email.host" in caught.value.message


async def test_smtp_with_a_username_but_no_password_is_secret_key_missing() -> None:
    with pytest.raises(base.CheckError) as caught:
        await email.check(
            block("smtp", host="127.0.0.1"), creds(username="mailer"), timeout=1, policy=OPEN
        )
    assert caught.value.reason is base.Reason.SECRET_KEY_MISSING
    assert "'password'" in caught.value.message


async def test_smtp_with_a_ca_that_is_not_pem_is_invalid_configuration() -> None:
    spec = block("smtp", host="127.0.0.1", startTLS=True)
    with pytest.raises(base.CheckError) as caught:
        await email.check(spec, creds(**{"ca.crt": "-----BEGIN nonsense"}), timeout=1, policy=OPEN)
    assert caught.value.reason is base.Reason.INVALID_CONFIGURATION
    assert "'ca.crt'" in caught.value.message


@pytest.mark.parametrize(
    ("fields", "port"),
    [({}, 25), ({"startTLS": True}, 587), ({"port": 2525, "startTLS": True}, 2525)],
)
def test_the_smtp_port_defaults_by_starttls(fields: dict[str, Any], port: int) -> None:
    assert email.smtp_port(block("smtp", host="smtp.example.test", **fields)) == port


# --- binding ------------------------------------------------------------------------


def test_binding_of_smtp_with_credentials() -> None:
    spec = block("smtp", host="smtp.example.test", startTLS=True)
    assert email.binding(spec, creds(username="mailer", password=PASSWORD)) == {
        "type": "email",
        "provider": "smtp",
        "from": "noreply@example.test",
        "host": "smtp.example.test",
        "port": "587",
        "startTLS": "true",
        "username": "mailer",
        "password": PASSWORD,
    }


def test_binding_of_smtp_without_credentials() -> None:
    spec = block("smtp", host="127.0.0.1", port=2525)
    assert email.binding(spec, creds()) == {
        "type": "email",
        "provider": "smtp",
        "from": "noreply@example.test",
        "host": "127.0.0.1",
        "port": "2525",
        "startTLS": "false",
    }


def test_binding_of_sendgrid() -> None:
    assert email.binding(block("sendgrid"), creds(apiKey=API_KEY)) == {
        "type": "email",
        "provider": "sendgrid",
        "from": "noreply@example.test",
        "apiBase": "https://api.sendgrid.com",
        "apiKey": API_KEY,
    }


def test_binding_of_mailgun() -> None:
    spec = block("mailgun", domain="mg.example.test", apiBase="https://api.eu.mailgun.net")
    assert email.binding(spec, creds(apiKey=API_KEY)) == {
        "type": "email",
        "provider": "mailgun",
        "from": "noreply@example.test",
        "apiBase": "https://api.eu.mailgun.net",
        "apiKey": API_KEY,
        "domain": "mg.example.test",
    }


@pytest.mark.parametrize(
    ("spec", "secrets"),
    [
        (block("smtp", host="smtp.example.test"), creds()),
        (block("smtp", host="smtp.example.test"), creds(username="u", password=PASSWORD)),
        (block("sendgrid"), creds(apiKey=API_KEY)),
        (block("mailgun", domain="mg.example.test"), creds(apiKey=API_KEY)),
    ],
)
def test_bindings_follow_the_shared_layout(
    spec: integration.Email, secrets: base.Credentials
) -> None:
    assert layout.problems(email.binding(spec, secrets)) == []


async def test_smtp_connects_to_the_judged_address(monkeypatch: pytest.MonkeyPatch) -> None:
    connected: list[tuple[str, int]] = []

    def create_connection(address: tuple[str, int], *args: Any) -> Any:
        connected.append(address)
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(email.socket, "create_connection", create_connection)
    with pytest.raises(base.CheckError) as caught:
        await email.check(block("smtp", host="smtp.example.test"), creds(), timeout=1, policy=OPEN)
    assert caught.value.reason is base.Reason.UNREACHABLE
    assert "SMTP server smtp.example.test:25 refused the connection" in caught.value.message
    assert connected == [(PUBLIC, 25)]
