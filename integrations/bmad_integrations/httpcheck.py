"""What the HTTP-based checks (auth0, email APIs, llm) share.

Each of them makes one or two cheap calls with httpx and must turn every way that
can fail into a `base.CheckError` whose message says what to change: transport
errors (refused, unresolvable, TLS, timeouts) map the same way for all of them, and
so do the answers that are never the caller's fault (429, 5xx) or never what a
correct configuration yields (redirects). The provider-specific meaning of 401, 403
and 404 stays in each module.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx

from bmad_integrations import base

# Longest piece of a server's own words quoted in a condition message.
_QUOTE_MAX = 200


def client(
    *,
    timeout: float,
    creds: base.Credentials,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A client for one check: its own timeout, no redirects, the Secret's CA if any."""
    verify: ssl.SSLContext | bool = True
    ca = creds.get("ca_cert")
    if ca:
        verify = tls_context(ca, creds=creds)
    return httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, verify=verify, transport=transport
    )


def tls_context(ca_pem: str | None, *, creds: base.Credentials) -> ssl.SSLContext:
    """The default verifying context, trusting only `ca_pem` when it is given."""
    try:
        return ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    except (ssl.SSLError, ValueError) as exc:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"key {creds.key('ca_cert')!r} of {secret(creds)} is not a PEM CA bundle "
            f"({creds.redact(str(exc))}): put the CA certificate(s) there in PEM form",
        ) from exc


def secret(creds: base.Credentials) -> str:
    """How a message names the credentials Secret: "Secret <name>" when it has one."""
    return f"Secret {creds.secret_name}" if creds.secret_name else "the credentials Secret"


def display_url(url: str | httpx.URL) -> str:
    """The URL without user info, query or fragment, fit for a message."""
    try:
        parsed = httpx.URL(url)
        return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "the configured URL"


def is_tls_failure(exc: BaseException) -> bool:
    """Whether an ssl error sits anywhere in the exception's cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    text = str(exc)
    return "[SSL" in text or "CERTIFICATE_VERIFY_FAILED" in text


def transport_error(
    exc: Exception, *, service: str, url: str | httpx.URL, timeout: float, creds: base.Credentials
) -> base.CheckError:
    """The CheckError for an httpx exception raised before any answer arrived."""
    where = display_url(url)
    detail = creds.redact(str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return base.CheckError(
            base.Reason.TIMEOUT,
            f"{service} at {where} did not answer within {timeout:g}s: check that the URL "
            "points at the service and that the network lets the operator reach it",
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{service} URL {where} is not usable ({detail}): set an http:// or https:// URL",
        )
    if isinstance(exc, httpx.ConnectError) and is_tls_failure(exc):
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with {service} at {where} failed ({detail}): if the server uses a private "
            f"CA, put its PEM certificate in key {creds.key('ca_cert')!r} of {secret(creds)}",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach {service} at {where} ({detail}): check the host name and port, and "
        "that the network lets the operator reach it",
    )


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    service: str,
    creds: base.Credentials,
    **kwargs: Any,
) -> httpx.Response:
    """Send one request; transport failures come back as a CheckError."""
    try:
        return await http.request(method, url, **kwargs)
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        limit = http.timeout.read or http.timeout.connect or 0.0
        raise transport_error(exc, service=service, url=url, timeout=limit, creds=creds) from None


def read_json(response: httpx.Response) -> Any:
    """The decoded body, or None when it is not JSON."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def status_line(response: httpx.Response) -> str:
    phrase = response.reason_phrase
    return f"{response.status_code} {phrase}" if phrase else str(response.status_code)


def quote(text: object, *, creds: base.Credentials) -> str:
    """A server's own words, redacted and shortened, for a message."""
    cleaned = " ".join(creds.redact(str(text)).split())
    if len(cleaned) > _QUOTE_MAX:
        cleaned = cleaned[: _QUOTE_MAX - 1] + "…"
    return cleaned


def unexpected(
    response: httpx.Response,
    *,
    service: str,
    creds: base.Credentials,
    fix: str,
    said: str | None = None,
) -> base.CheckError:
    """The CheckError for an answer the caller has no specific meaning for.

    429 and 5xx mean the service is there but cannot serve now (Unreachable, so the
    check is retried); a redirect or any other status means the configured URL is not
    the API (InvalidConfiguration, with `fix` saying what to change).
    """
    where = display_url(response.request.url)
    status = status_line(response)
    extra = f": {quote(said, creds=creds)}" if said else ""
    if response.status_code == 429 or response.status_code >= 500:
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"{service} at {where} answered {status}{extra}; the check is retried, and if "
            "it persists check the service's status and the account's limits",
        )
    if 300 <= response.status_code < 400:
        location = response.headers.get("location")
        to = f" to {display_url(location)}" if location else ""
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{service} at {where} answered {status} (a redirect{to}): {fix}",
        )
    return base.CheckError(
        base.Reason.INVALID_CONFIGURATION,
        f"{service} at {where} answered {status}{extra}: {fix}",
    )


def join(base_url: str, path: str) -> str:
    """`base_url` and `path` with exactly one slash between them."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")
