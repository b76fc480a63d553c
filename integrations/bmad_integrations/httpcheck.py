"""What the HTTP-based checks share: auth0, the e-mail APIs and llm with httpx, and
the Stripe SDK and botocore through `sync_client`.

Every client made here sends each request through the egress policy
(`egress_transport.AsyncTransport`), follows no redirect and ignores proxy variables. Each check
makes one or two cheap calls and must turn every way that can fail into a
`base.CheckError` whose message says what to change: transport errors (refused,
unresolvable, TLS, timeouts) map the same way for all of them, and so do the answers
that are never the caller's fault (429, 5xx) or never what a correct configuration
yields (redirects). The provider-specific meaning of 401, 403 and 404 stays in each
module. No message quotes what a server said: only its status code.
"""

from __future__ import annotations

import json
import ssl
from typing import TYPE_CHECKING, Any

from bmad_integrations import base, egress, lazy

if TYPE_CHECKING:
    import httpx

    from bmad_integrations import egress_transport
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")
    egress_transport = lazy.module("bmad_integrations.egress_transport")


def client(
    *,
    timeout: float,
    creds: base.Credentials,
    policy: egress.Policy,
    field: str,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A client for one check: its own timeout, no redirects, the Secret's CA if any,
    and every request judged by the egress policy (`field` names where its URL comes
    from). `transport` replaces the network (tests); the policy still applies."""
    verify = verify_for(creds)  # a CA that is not PEM fails here, before any request
    inner = transport or httpx.AsyncHTTPTransport(verify=verify)
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=False,
        # Nothing from the environment (proxies, .netrc, CA files) changes a check.
        trust_env=False,
        transport=egress_transport.AsyncTransport(policy, field=field, inner=inner),
    )


def sync_client(
    *,
    timeout: float,
    policy: egress.Policy,
    field: str,
    verify: ssl.SSLContext | bool = True,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """`client` for the SDKs that run in a worker thread (Stripe, botocore)."""
    inner = transport or httpx.HTTPTransport(verify=verify)
    return httpx.Client(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        transport=egress_transport.SyncTransport(policy, field=field, inner=inner),
    )


def verify_for(creds: base.Credentials) -> ssl.SSLContext:
    """The verifying TLS context: the Secret's CA when it has one, else the system's."""
    return tls_context(creds.get("ca_cert"), creds=creds)


def tls_context(ca_pem: str | None, *, creds: base.Credentials) -> ssl.SSLContext:
    """The default verifying context, trusting only `ca_pem` when it is given."""
    try:
        return ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    except (ssl.SSLError, ValueError):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"key {creds.key('ca_cert')!r} of {secret(creds)} is not a PEM CA bundle: put "
            "the CA certificate(s) there in PEM form",
        ) from None


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
    return base.caused_by(exc, ssl.SSLError) or "[SSL" in str(exc)


def transport_error(
    exc: Exception,
    *,
    service: str,
    url: str | httpx.URL,
    timeout: float,
    creds: base.Credentials,
    shown: bool = True,
) -> base.CheckError:
    """The CheckError for an httpx exception raised before any answer arrived."""
    where = display_url(url) if shown else "the URL it names"
    if isinstance(exc, httpx.TimeoutException):
        return base.CheckError(
            base.Reason.TIMEOUT,
            f"{service} at {where} did not answer within {timeout:g}s: check that the URL "
            "points at the service and that the network lets the operator reach it",
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{service} URL {where} is not usable: set an http:// or https:// URL with a host",
        )
    if isinstance(exc, httpx.ConnectError) and is_tls_failure(exc):
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with {service} at {where} failed ({base.tls_problem(exc)}): if the server "
            f"uses a private CA, put its PEM certificate in key {creds.key('ca_cert')!r} of "
            f"{secret(creds)}",
        )
    if base.caused_by(exc, ConnectionRefusedError):
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"{service} at {where} refused the connection: check the host name and port, "
            "and that the service runs",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach {service} at {where}: check the host name and port, and that the "
        "network lets the operator reach it",
    )


def check_base_url(url: str, *, field: str) -> None:
    """Refuse a configured URL that the check's own path could not safely extend.

    A query or fragment would swallow the path the check appends (``…?x=`` + ``/models``
    asks for whatever path the URL names), and user info would be sent as credentials
    that no Secret holds.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if (
        parsed is None
        or parsed.scheme not in ("http", "https")
        or not parsed.host
        or parsed.userinfo
        or parsed.query
        or parsed.fragment
        or "?" in url
        or "#" in url
    ):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{field} must be an http:// or https:// URL with a host and a path at most: no "
            "user info, query (?) or fragment (#)",
        )


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    service: str,
    creds: base.Credentials,
    shown: bool = True,
    **kwargs: Any,
) -> httpx.Response:
    """Send one request; transport failures come back as a CheckError.

    `shown`: whether messages may show the URL (not when a server chose it).
    """
    try:
        return await http.request(method, url, **kwargs)
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        limit = http.timeout.read or http.timeout.connect or 0.0
        raise transport_error(
            exc, service=service, url=url, timeout=limit, creds=creds, shown=shown
        ) from None


def read_json(response: httpx.Response) -> Any:
    """The decoded body, or None when it is not JSON."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def unexpected(
    response: httpx.Response,
    *,
    service: str,
    fix: str,
    shown: bool = True,
) -> base.CheckError:
    """The CheckError for an answer the caller has no specific meaning for.

    429 and 5xx mean the service is there but cannot serve now (Unreachable, so the
    check is retried); a redirect or any other status means the configured URL is not
    the API (InvalidConfiguration, with `fix` saying what to change). Only the status
    code is shown: never the server's reason phrase, body or Location; and the URL only
    when it is `shown` (not when a server chose it).
    """
    where = display_url(response.request.url) if shown else "the URL it names"
    code = response.status_code
    if code == 429 or code >= 500:
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"{service} at {where} answered {code}; the check is retried, and if it persists "
            "check the service's status and the account's limits",
        )
    if 300 <= code < 400:
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{service} at {where} answered {code}, a redirect, which checks do not follow: {fix}",
        )
    return base.CheckError(
        base.Reason.INVALID_CONFIGURATION, f"{service} at {where} answered {code}: {fix}"
    )


def join(base_url: str, path: str) -> str:
    """`base_url` and `path` with exactly one slash between them."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")
