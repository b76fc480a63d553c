"""E-mail senders: an SMTP server, SendGrid or Mailgun.

SMTP is checked with the standard library's smtplib, run in a worker thread: connect,
EHLO, STARTTLS when asked, AUTH when the Secret holds a username, NOOP, QUIT; nothing
is sent. The two HTTP APIs are checked with one read-only call that needs the API
key: SendGrid's list of the key's scopes, Mailgun's record of the sending domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.utils
import smtplib
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, httpcheck, lazy

if TYPE_CHECKING:
    import httpx
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")

SENDGRID_API_BASE = "https://api.sendgrid.com"
MAILGUN_API_BASE = "https://api.mailgun.net"
SMTP_PORT = 25
SUBMISSION_PORT = 587
# The scope a SendGrid key needs to send mail at all.
SENDGRID_SEND_SCOPE = "mail.send"
# The domain states Mailgun documents; any other answer is not shown.
_MAILGUN_STATES = frozenset({"active", "unverified", "disabled"})
_MAILGUN_EU = " (EU accounts need spec.email.apiBase https://api.eu.mailgun.net)"
HOST_FIELD = "spec.email.host"
API_BASE_FIELD = "spec.email.apiBase"


def smtp_port(block: integration.Email) -> int:
    """The port to use: spec.email.port, else 587 with STARTTLS and 25 without."""
    if block.port is not None:
        return block.port
    return SUBMISSION_PORT if block.start_tls else SMTP_PORT


def api_base(block: integration.Email) -> str:
    if block.api_base:
        return block.api_base
    return MAILGUN_API_BASE if block.provider == "mailgun" else SENDGRID_API_BASE


async def check(
    block: integration.Email,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds the network exchange, not the coroutine
    policy: egress.Policy,
    transport: httpx.AsyncBaseTransport | None = None,
) -> base.Checked:
    if block.provider == "smtp":
        # smtplib blocks; its sockets carry the timeout, so the thread always ends.
        session = _smtp_session(block, creds, timeout=timeout, policy=policy)
        return await asyncio.to_thread(session.run)
    httpcheck.check_base_url(api_base(block), field=API_BASE_FIELD)
    async with httpcheck.client(
        timeout=timeout, creds=creds, policy=policy, field=API_BASE_FIELD, transport=transport
    ) as http:
        if block.provider == "sendgrid":
            return await _check_sendgrid(http, block, creds)
        return await _check_mailgun(http, block, creds)


# --- SMTP ---------------------------------------------------------------------------


def _smtp_session(
    block: integration.Email, creds: base.Credentials, *, timeout: float, policy: egress.Policy
) -> _SmtpSession:
    if not block.host:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            "spec.email.host is required when spec.email.provider is 'smtp': "
            "set the SMTP server's host name",
        )
    username = creds.get("username")
    password = creds.require("password") if username else None
    # Read the CA before connecting, so a bad PEM is a configuration error, not TLS.
    context = httpcheck.tls_context(creds.get("ca_cert"), creds=creds) if block.start_tls else None
    return _SmtpSession(
        host=block.host,
        port=smtp_port(block),
        timeout=timeout,
        policy=policy,
        creds=creds,
        context=context,
        login=(username, password) if username is not None and password is not None else None,
    )


class _Smtp(smtplib.SMTP):
    """smtplib's client, connecting to the address the egress policy judged.

    smtplib keeps the host name it was given for STARTTLS, so the certificate is
    still verified against the name; only the socket goes to the judged address.
    """

    def __init__(self, destination: egress.Destination, *, timeout: float) -> None:
        self.destination = destination
        super().__init__(destination.host, destination.port, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.destination.address, port), timeout, self.source_address
        )


class _SmtpSession:
    """One blocking SMTP conversation under an overall deadline."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        timeout: float,
        policy: egress.Policy,
        creds: base.Credentials,
        context: ssl.SSLContext | None,
        login: tuple[str, str] | None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.policy = policy
        self.creds = creds
        self.context = context
        self.login = login
        self.where = f"SMTP server {egress.where(host, port)}"
        self.deadline = 0.0

    def run(self) -> base.Checked:
        self.deadline = time.monotonic() + self.timeout
        destination = self.policy.destination_sync(self.host, self.port, field=HOST_FIELD)
        conn: _Smtp | None = None
        try:
            conn = _Smtp(destination, timeout=self.timeout)
            return self._converse(conn)
        except base.CheckError:
            raise
        except smtplib.SMTPServerDisconnected:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} closed the connection: check that the port is an SMTP port, "
                "and spec.email.startTLS",
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} answered {exc.smtp_code}: check the server's state and spec.email",
            ) from None
        except smtplib.SMTPException:
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"{self.where} did not speak SMTP as expected: check spec.email",
            ) from None
        except ssl.SSLError as exc:
            raise self._tls_error(exc) from None
        except TimeoutError:
            raise base.CheckError(
                base.Reason.TIMEOUT,
                f"{self.where} did not answer within {self.timeout:g}s: check the host, the "
                "port, and that the network lets the operator reach it",
            ) from None
        except ConnectionRefusedError:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} refused the connection: check spec.email.host and "
                "spec.email.port, and that the server runs",
            ) from None
        except OSError:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"cannot reach {self.where}: check spec.email.host and spec.email.port, and "
                "that the network lets the operator reach it",
            ) from None
        finally:
            if conn is not None:
                conn.close()

    def _converse(self, conn: _Smtp) -> base.Checked:
        self._tick(conn)
        conn.ehlo()
        if self.context is not None:
            self._starttls(conn, self.context)
        if self.login is not None:
            self._login(conn, *self.login)
        self._tick(conn)
        code, _ = conn.noop()
        if code != 250:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} answered NOOP with {code}: check the server's state",
            )
        self._tick(conn)
        # The check already passed; a rude goodbye changes nothing.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            conn.quit()
        steps = ["STARTTLS"] if self.context is not None else []
        if self.login is not None:
            steps.append("AUTH")
        detail = f"{self.where} accepted EHLO" + "".join(f", {s}" for s in steps) + " and NOOP"
        # No server version: the greeting is the server's own words.
        return base.Checked(detail=detail)

    def _starttls(self, conn: smtplib.SMTP, context: ssl.SSLContext) -> None:
        if not conn.has_extn("starttls"):
            raise base.CheckError(
                base.Reason.TLS_ERROR,
                f"{self.where} does not offer STARTTLS: set spec.email.startTLS to false, or "
                "point spec.email.host/port at a server that does",
            )
        self._tick(conn)
        try:
            conn.starttls(context=context)
        except smtplib.SMTPResponseException as exc:
            raise base.CheckError(
                base.Reason.TLS_ERROR,
                f"{self.where} refused STARTTLS ({exc.smtp_code}): check the server's TLS "
                "setup, or set spec.email.startTLS to false",
            ) from None
        except ssl.SSLError as exc:
            raise self._tls_error(exc) from None
        self._tick(conn)
        conn.ehlo()

    def _login(self, conn: smtplib.SMTP, username: str, password: str) -> None:
        self._tick(conn)
        try:
            conn.login(username, password)
        except smtplib.SMTPAuthenticationError as exc:
            raise base.CheckError(
                base.Reason.AUTHENTICATION_FAILED,
                f"{self.where} rejected the login ({exc.smtp_code}): check keys "
                f"{self.creds.key('username')!r} and {self.creds.key('password')!r} of "
                f"{httpcheck.secret(self.creds)}",
            ) from None
        except smtplib.SMTPNotSupportedError:
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"{self.where} offers no AUTH on this connection, but "
                f"{httpcheck.secret(self.creds)} holds key "
                f"{self.creds.key('username')!r}: set spec.email.startTLS to true if the "
                "server only authenticates over TLS, or remove that key",
            ) from None
        except smtplib.SMTPException as exc:
            if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPResponseException):
                raise
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"{self.where} offers no AUTH method smtplib speaks (PLAIN, LOGIN, CRAM-MD5): "
                "enable one of them on the server",
            ) from None

    def _tls_error(self, exc: ssl.SSLError) -> base.CheckError:
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with {self.where} failed ({base.tls_problem(exc)}): if the server uses a "
            f"private CA, put its PEM certificate in key {self.creds.key('ca_cert')!r} of "
            f"{httpcheck.secret(self.creds)}; the certificate must name spec.email.host",
        )

    def _tick(self, conn: smtplib.SMTP) -> None:
        """Give the next command only what is left of the overall timeout."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if conn.sock is not None:
            conn.sock.settimeout(left)


# --- SendGrid and Mailgun -----------------------------------------------------------


async def _check_sendgrid(
    http: httpx.AsyncClient, block: integration.Email, creds: base.Credentials
) -> base.Checked:
    api_key = creds.require("api_key")
    url = httpcheck.join(api_base(block), "v3/scopes")
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    response = await httpcheck.send(
        http, "GET", url, service="SendGrid", creds=creds, headers=headers
    )
    body = _answer(response, service="SendGrid", creds=creds)
    scopes = body.get("scopes") if isinstance(body, dict) else None
    if not isinstance(scopes, list):
        raise _not_the_api(url, "SendGrid's list of scopes")
    if SENDGRID_SEND_SCOPE not in scopes:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the SendGrid API key lacks the {SENDGRID_SEND_SCOPE} scope, so it cannot send "
            f"mail: give it Mail Send access, or put a key that has it in key "
            f"{creds.key('api_key')!r} of {httpcheck.secret(creds)}",
        )
    return base.Checked(detail=f"SendGrid API key valid, {len(scopes)} scope(s)")


async def _check_mailgun(
    http: httpx.AsyncClient, block: integration.Email, creds: base.Credentials
) -> base.Checked:
    if not block.domain:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            "spec.email.domain is required when spec.email.provider is 'mailgun': "
            "set the Mailgun sending domain",
        )
    api_key = creds.require("api_key")
    url = httpcheck.join(api_base(block), "v3/domains/" + urllib.parse.quote(block.domain, safe=""))
    headers = {"Accept": "application/json"}
    response = await httpcheck.send(
        http, "GET", url, service="Mailgun", creds=creds, auth=("api", api_key), headers=headers
    )
    if response.status_code == 404:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Mailgun knows no domain {block.domain!r} for this API key: set "
            f"spec.email.domain to a sending domain of the account{_MAILGUN_EU}",
        )
    body = _answer(response, service="Mailgun", creds=creds, hint=_MAILGUN_EU)
    record = body.get("domain") if isinstance(body, dict) else None
    if not isinstance(record, dict):
        raise _not_the_api(url, "a Mailgun domain record")
    state = record.get("state")
    shown = f" ({state})" if state in _MAILGUN_STATES else ""
    return base.Checked(detail=f"Mailgun domain {block.domain}{shown}")


def _answer(
    response: httpx.Response, *, service: str, creds: base.Credentials, hint: str = ""
) -> Any:
    """The decoded body of a 200 answer; a refused key or any other status raises."""
    if response.status_code in (401, 403):
        raise base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"{service} rejected the API key ({response.status_code}): put a valid "
            f"{service} API key in key {creds.key('api_key')!r} of "
            f"{httpcheck.secret(creds)}{hint}",
        )
    if response.status_code != 200:
        raise httpcheck.unexpected(
            response,
            service=service,
            fix=f"check spec.email.apiBase (the {service} API base, without /v3)",
        )
    return httpcheck.read_json(response)


def _not_the_api(url: str, what: str) -> base.CheckError:
    return base.CheckError(
        base.Reason.INVALID_CONFIGURATION,
        f"{httpcheck.display_url(url)} did not answer with {what}: check spec.email.apiBase",
    )


# --- binding ------------------------------------------------------------------------


def binding(block: integration.Email, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: where to send from and with which credentials."""
    data = {"type": "email", "provider": block.provider, "from": block.from_}
    if block.provider == "smtp":
        if block.host:
            data["host"] = block.host
        data["port"] = str(smtp_port(block))
        data["startTLS"] = "true" if block.start_tls else "false"
        username = creds.get("username")
        password = creds.get("password")
        if username:
            data["username"] = username
        if password:
            data["password"] = password
    else:
        data["apiBase"] = api_base(block)
        api_key = creds.get("api_key")
        if api_key:
            data["apiKey"] = api_key
        if block.domain:
            data["domain"] = block.domain
    return data


# --- sending ------------------------------------------------------------------------


class Mail(NamedTuple):
    """One plain-text message."""

    sender: str
    recipients: tuple[str, ...]
    subject: str
    body: str
    message_id: str | None = None
    """A stable Message-ID, so that a message sent twice (a retry) reads as one."""


class SendError(Exception):
    """A message could not be sent; the message says what to check and names no secret."""


async def send(
    data: Mapping[str, str],
    mail: Mail,
    *,
    policy: egress.Policy,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounds the network exchange
) -> None:
    """Send ``mail`` with the settings of an email binding (its Secret's data).

    SMTP only: connect (where the egress policy allows), EHLO, STARTTLS when the
    binding says ``startTLS``, AUTH when it holds a username, then the message.
    """
    provider = data.get("provider", "")
    if provider != "smtp":
        raise SendError(
            f"sending through an email Integration of provider {provider!r} is not "
            "supported: use an smtp Integration for notifications"
        )
    host = data.get("host", "")
    if not host:
        raise SendError("the email binding names no host: check spec.email.host")
    try:
        port = int(data.get("port") or SMTP_PORT)
    except ValueError:
        raise SendError("the email binding's port is not a number: check spec.email.port") from None
    session = _Sender(
        host=host,
        port=port,
        start_tls=data.get("startTLS", "false") == "true",
        login=(data["username"], data.get("password", "")) if data.get("username") else None,
        timeout=timeout,
        policy=policy,
    )
    await asyncio.to_thread(session.send, mail)


class _Sender:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        start_tls: bool,
        login: tuple[str, str] | None,
        timeout: float,
        policy: egress.Policy,
    ) -> None:
        self.host = host
        self.port = port
        self.start_tls = start_tls
        self.login = login
        self.timeout = timeout
        self.policy = policy
        self.where = f"SMTP server {egress.where(host, port)}"

    def send(self, mail: Mail) -> None:
        message = email.message.EmailMessage()
        message["From"] = mail.sender
        message["To"] = ", ".join(mail.recipients)
        message["Subject"] = mail.subject
        message["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
        if mail.message_id:
            message["Message-ID"] = mail.message_id
        message.set_content(mail.body)
        try:
            destination = self.policy.destination_sync(self.host, self.port, field=HOST_FIELD)
        except base.CheckError as exc:
            raise SendError(exc.message) from None
        conn: _Smtp | None = None
        try:
            conn = _Smtp(destination, timeout=self.timeout)
            conn.ehlo()
            if self.start_tls:
                conn.starttls(context=ssl.create_default_context())
                conn.ehlo()
            if self.login is not None:
                conn.login(*self.login)
            refused = conn.send_message(message, mail.sender, list(mail.recipients))
            if refused:
                raise SendError(
                    f"{self.where} refused recipients {', '.join(sorted(refused))}: check "
                    "spec.notify.recipients"
                )
            with contextlib.suppress(smtplib.SMTPException, OSError):
                conn.quit()
        except smtplib.SMTPAuthenticationError as exc:
            raise SendError(
                f"{self.where} rejected the login ({exc.smtp_code}): check the credentials "
                "of the email Integration"
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise SendError(f"{self.where} answered {exc.smtp_code} while sending") from None
        except (smtplib.SMTPException, ssl.SSLError) as exc:
            raise SendError(f"{self.where}: {type(exc).__name__} while sending") from None
        except TimeoutError:
            raise SendError(f"{self.where} did not answer within {self.timeout:g}s") from None
        except OSError:
            raise SendError(
                f"cannot reach {self.where}: check spec.email.host and spec.email.port"
            ) from None
        finally:
            if conn is not None:
                conn.close()
