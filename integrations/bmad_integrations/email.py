"""E-mail senders: an SMTP server, SendGrid or Mailgun.

SMTP is checked with the standard library's smtplib, run in a worker thread: connect,
EHLO, STARTTLS when asked, AUTH when the Secret holds a username, NOOP, QUIT; nothing
is sent. The two HTTP APIs are checked with one read-only call that needs the API
key: SendGrid's list of the key's scopes, Mailgun's record of the sending domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import time
import urllib.parse
from typing import Any

import httpx

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, httpcheck

SENDGRID_API_BASE = "https://api.sendgrid.com"
MAILGUN_API_BASE = "https://api.mailgun.net"
SMTP_PORT = 25
SUBMISSION_PORT = 587
# The scope a SendGrid key needs to send mail at all.
SENDGRID_SEND_SCOPE = "mail.send"
_VERSION_MAX = 63


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
    transport: httpx.AsyncBaseTransport | None = None,
) -> base.Checked:
    if block.provider == "smtp":
        # smtplib blocks; its sockets carry the timeout, so the thread always ends.
        return await asyncio.to_thread(_smtp_session(block, creds, timeout=timeout).run)
    async with httpcheck.client(timeout=timeout, creds=creds, transport=transport) as http:
        if block.provider == "sendgrid":
            return await _check_sendgrid(http, block, creds)
        return await _check_mailgun(http, block, creds)


# --- SMTP ---------------------------------------------------------------------------


def _smtp_session(
    block: integration.Email, creds: base.Credentials, *, timeout: float
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
        creds=creds,
        context=context,
        username=username,
        password=password,
    )


class _Smtp(smtplib.SMTP):
    """smtplib's client, keeping the greeting (it names the server software)."""

    banner: bytes = b""

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        code, message = super().connect(host, port, source_address)
        self.banner = message
        return code, message


class _SmtpSession:
    """One blocking SMTP conversation under an overall deadline."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        timeout: float,
        creds: base.Credentials,
        context: ssl.SSLContext | None,
        username: str | None,
        password: str | None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.creds = creds
        self.context = context
        self.username = username
        self.password = password
        self.where = f"SMTP server {host}:{port}"
        self.deadline = 0.0

    def run(self) -> base.Checked:
        self.deadline = time.monotonic() + self.timeout
        conn: _Smtp | None = None
        try:
            # Connecting in the constructor also tells smtplib the host name that
            # STARTTLS must verify the certificate against.
            conn = _Smtp(self.host, self.port, timeout=self.timeout)
            return self._converse(conn)
        except base.CheckError:
            raise
        except smtplib.SMTPServerDisconnected as exc:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} closed the connection ({self._said(exc)}): check that the "
                "port is an SMTP port, and spec.email.startTLS",
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} answered {exc.smtp_code} {self._said(exc.smtp_error)}: "
                "check the server's state and spec.email",
            ) from None
        except smtplib.SMTPException as exc:
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"{self.where}: {self._said(exc)}: check spec.email",
            ) from None
        except ssl.SSLError as exc:
            raise self._tls_error(exc) from None
        except TimeoutError:
            raise base.CheckError(
                base.Reason.TIMEOUT,
                f"{self.where} did not answer within {self.timeout:g}s: check the host, the "
                "port, and that the network lets the operator reach it",
            ) from None
        except socket.gaierror as exc:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"cannot resolve {self.host} ({self._said(exc)}): check spec.email.host",
            ) from None
        except OSError as exc:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"cannot reach {self.where} ({self._said(exc)}): check spec.email.host and "
                "spec.email.port, and that the network lets the operator reach it",
            ) from None
        finally:
            if conn is not None:
                conn.close()

    def _converse(self, conn: _Smtp) -> base.Checked:
        context, username, password = self.context, self.username, self.password
        self._tick(conn)
        conn.ehlo()
        if context is not None:
            self._starttls(conn, context)
        if username is not None and password is not None:
            self._login(conn, username, password)
        self._tick(conn)
        code, reply = conn.noop()
        if code != 250:
            raise base.CheckError(
                base.Reason.UNREACHABLE,
                f"{self.where} answered NOOP with {code} {self._said(reply)}: check the "
                "server's state",
            )
        self._tick(conn)
        # The check already passed; a rude goodbye changes nothing.
        with contextlib.suppress(smtplib.SMTPException, OSError):
            conn.quit()
        steps = ["STARTTLS"] if context is not None else []
        if username is not None:
            steps.append("AUTH")
        detail = f"{self.where} accepted EHLO" + "".join(f", {s}" for s in steps) + " and NOOP"
        return base.Checked(server_version=_server_version(conn.banner), detail=detail)

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
                f"{self.where} refused STARTTLS ({exc.smtp_code} "
                f"{self._said(exc.smtp_error)}): check the server's TLS setup, or set "
                "spec.email.startTLS to false",
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
                f"{self.where} rejected the login ({exc.smtp_code} "
                f"{self._said(exc.smtp_error)}): check keys {self.creds.key('username')!r} "
                f"and {self.creds.key('password')!r} of {httpcheck.secret(self.creds)}",
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
                f"{self.where} offers no AUTH method smtplib speaks (PLAIN, LOGIN, CRAM-MD5) "
                f"({self._said(exc)}): enable one of them on the server",
            ) from None

    def _tls_error(self, exc: ssl.SSLError) -> base.CheckError:
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with {self.where} failed ({self._said(exc)}): if the server uses a private "
            f"CA, put its PEM certificate in key {self.creds.key('ca_cert')!r} of "
            f"{httpcheck.secret(self.creds)}; "
            "the certificate must name spec.email.host",
        )

    def _tick(self, conn: smtplib.SMTP) -> None:
        """Give the next command only what is left of the overall timeout."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if conn.sock is not None:
            conn.sock.settimeout(left)

    def _said(self, text: object) -> str:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return httpcheck.quote(text, creds=self.creds)


def _server_version(banner: bytes | str) -> str | None:
    """The greeting without the host name: "ESMTP Postfix", "Python SMTP 1.4.6"."""
    text = banner.decode("utf-8", "replace") if isinstance(banner, bytes) else banner
    words = text.split()
    if len(words) > 1:
        words = words[1:]
    version = " ".join(words)[:_VERSION_MAX].strip()
    return version or None


# --- SendGrid and Mailgun -----------------------------------------------------------


async def _check_sendgrid(
    http: httpx.AsyncClient, block: integration.Email, creds: base.Credentials
) -> base.Checked:
    api_key = creds.require("api_key")
    service = "SendGrid"
    url = httpcheck.join(api_base(block), "v3/scopes")
    response = await httpcheck.send(
        http,
        "GET",
        url,
        service=service,
        creds=creds,
        headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
    )
    body = httpcheck.read_json(response)
    if response.status_code in (401, 403):
        raise base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"SendGrid rejected the API key ({httpcheck.status_line(response)}"
            f"{_sendgrid_said(body, creds)}): put a valid SendGrid API key in key "
            f"{creds.key('api_key')!r} of {httpcheck.secret(creds)}",
        )
    if response.status_code != 200:
        raise httpcheck.unexpected(
            response,
            service=service,
            creds=creds,
            fix="check spec.email.apiBase (the SendGrid API base, without /v3)",
        )
    scopes = body.get("scopes") if isinstance(body, dict) else None
    if not isinstance(scopes, list):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{httpcheck.display_url(url)} did not answer with SendGrid's list of scopes: "
            "check spec.email.apiBase",
        )
    if SENDGRID_SEND_SCOPE not in scopes:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the SendGrid API key lacks the {SENDGRID_SEND_SCOPE} scope, so it cannot send "
            f"mail: give it Mail Send access, or put a key that has it in key "
            f"{creds.key('api_key')!r} of {httpcheck.secret(creds)}",
        )
    return base.Checked(detail=f"SendGrid API key valid, {len(scopes)} scope(s)")


def _sendgrid_said(body: object, creds: base.Credentials) -> str:
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        message = errors[0].get("message")
        if message:
            return f": {httpcheck.quote(message, creds=creds)}"
    return ""


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
    service = "Mailgun"
    path = "v3/domains/" + urllib.parse.quote(block.domain, safe="")
    url = httpcheck.join(api_base(block), path)
    response = await httpcheck.send(
        http,
        "GET",
        url,
        service=service,
        creds=creds,
        auth=("api", api_key),
        headers={"Accept": "application/json"},
    )
    if response.status_code in (401, 403):
        raise base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Mailgun rejected the API key ({httpcheck.status_line(response)}): put a valid "
            f"Mailgun private API key in key {creds.key('api_key')!r} of "
            f"{httpcheck.secret(creds)} (EU accounts also need spec.email.apiBase "
            "https://api.eu.mailgun.net)",
        )
    if response.status_code == 404:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Mailgun knows no domain {block.domain!r} for this API key: set "
            "spec.email.domain to a sending domain of the account (EU domains need "
            "spec.email.apiBase https://api.eu.mailgun.net)",
        )
    if response.status_code != 200:
        raise httpcheck.unexpected(
            response,
            service=service,
            creds=creds,
            fix="check spec.email.apiBase (the Mailgun API base, without /v3)",
        )
    body = httpcheck.read_json(response)
    record = body.get("domain") if isinstance(body, dict) else None
    if not isinstance(record, dict):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{httpcheck.display_url(url)} did not answer with a Mailgun domain record: "
            "check spec.email.apiBase",
        )
    state = record.get("state")
    shown = f" ({httpcheck.quote(state, creds=creds)})" if isinstance(state, str) else ""
    return base.Checked(detail=f"Mailgun domain {block.domain}{shown}")


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
