"""PostgreSQL: connect with asyncpg the way the agents will, and ask for the version.

The check honours ``sslMode`` with libpq's meaning, so that a database the operator
reports Ready is one the runtime can reach with the same settings. asyncpg reports
failures as server SQLSTATEs (28P01, 3D000, …) or as plain OS errors; `error_for`
turns each into the reason a user can act on.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, lazy

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
else:  # imported when first used: only where PostgreSQL is configured
    asyncpg = lazy.module("asyncpg")

PROVIDER = "postgresql"
APPLICATION_NAME = "bmad-operator-check"
HOST_FIELD = "spec.postgres.host"


def target(block: integration.Postgres) -> str:
    return f"{block.host}:{block.port}/{block.database}"


class _NamedContext(ssl.SSLContext):
    """A client TLS context that verifies the certificate against one host name.

    The socket goes to the address the egress policy judged, and asyncpg names that
    address when it starts TLS; this context puts the configured host name back, so
    ``verify-full`` still checks the certificate against the name.
    """

    server_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, self.server_name or server_hostname, session
        )


@dataclass(frozen=True)
class Transport:
    """How to open a connection for one sslMode: asyncpg's ``ssl`` argument (None: the
    DSN's own ``sslmode`` decides) and what may happen on the way.

    ``plaintext_fallback``: the server may be used without TLS when it offers none
    (``allow``, ``prefer``); ``verified``: a TLS connection checks the certificate.
    """

    ssl: ssl.SSLContext | bool | str | None
    plaintext_fallback: bool
    verified: bool


class BadCaError(ValueError):
    """The CA bundle given is not PEM certificates."""


def transport(mode: str, ca: str | None, *, server_name: str) -> Transport:
    """The `Transport` of an sslMode with libpq's meaning, and the CA honoured.

    ``disable``: plaintext. ``allow``: asyncpg's own (plaintext first, TLS when the
    server insists; never verified). ``prefer``: TLS when the server offers it, else
    plaintext; with a CA the certificate is verified against it (asyncpg alone would
    not). ``require``: TLS only; verified against the CA when one is given (libpq's
    verify-ca), encrypted without verification when not. ``verify-ca``: TLS only, the
    chain checked against the CA (or the system store); ``verify-full``: also the host
    name (`server_name`, which the socket's address does not change).
    """
    if mode == "disable":
        return Transport(ssl=False, plaintext_fallback=False, verified=False)
    if mode == "allow" or (mode == "prefer" and not ca):
        return Transport(ssl=mode, plaintext_fallback=True, verified=False)
    context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = server_name
    if mode == "require" and not ca:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return Transport(ssl=context, plaintext_fallback=False, verified=False)
    try:
        if ca:
            context.load_verify_locations(cadata=ca)
        else:
            context.load_default_certs()
    except (ssl.SSLError, ValueError):
        raise BadCaError("not a PEM CA bundle") from None
    context.check_hostname = mode == "verify-full"
    return Transport(ssl=context, plaintext_fallback=mode == "prefer", verified=True)


def refused_tls(exc: BaseException) -> bool:
    """asyncpg's error when the server answers an SSLRequest with "no TLS here"."""
    return isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc)


ENCRYPTED_QUERY = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


async def is_encrypted(conn: Any) -> bool:
    """Whether the server says this session is TLS (``pg_stat_ssl``), whatever the
    client asked for."""
    return bool(await conn.fetchval(ENCRYPTED_QUERY))


def ssl_argument(
    block: integration.Postgres, creds: base.Credentials
) -> ssl.SSLContext | bool | str | None:
    """What asyncpg's ``ssl`` parameter gets for the block's sslMode (`transport`)."""
    return _transport(block, creds).ssl


def _transport(block: integration.Postgres, creds: base.Credentials) -> Transport:
    try:
        return transport(block.ssl_mode, creds.get("ca_cert"), server_name=host(block))
    except BadCaError:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"key {creds.key('ca_cert')!r} of the credentials Secret is not a PEM CA bundle: "
            "put the server's CA certificate(s) there in PEM form",
        ) from None


def host(block: integration.Postgres) -> str:
    return block.host.removeprefix("[").removesuffix("]")


def error_for(
    exc: BaseException, *, block: integration.Postgres, creds: base.Credentials, timeout: float
) -> base.CheckError:
    """The CheckError for anything asyncpg or the network raised during the check.

    The server's own words never reach the message: only the class of error asyncpg
    raised (which stands for a SQLSTATE) decides what it says.
    """
    where = target(block)
    if isinstance(exc, base.CheckError):
        return exc
    # 28P01 (wrong password, or an unknown role under password auth) and 28000 (no such
    # role, or no pg_hba.conf entry) are both answers about who may log in.
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"PostgreSQL at {where} refused the login: check the keys "
            f"{creds.key('username')!r} and {creds.key('password')!r} of the credentials "
            "Secret, that the role exists and may log in, and the server's pg_hba.conf",
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"PostgreSQL at {block.host}:{block.port} has no database named in "
            "spec.postgres.database: create it, or fix spec.postgres.database",
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"PostgreSQL at {where} denied the role access: grant it CONNECT on the database",
        )
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"cannot configure the connection to {where}: check spec.postgres",
        )
    if _is_tls_failure(exc):
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with PostgreSQL at {where} failed ({_tls_problem(exc)}): with sslMode "
            f"{block.ssl_mode!r} the server must offer TLS"
            + (
                f" and present a certificate signed by the CA in key {creds.key('ca_cert')!r}"
                if block.ssl_mode.startswith("verify") or creds.get("ca_cert")
                else ""
            )
            + "; or change spec.postgres.sslMode",
        )
    if isinstance(exc, TimeoutError):
        return base.CheckError(
            base.Reason.TIMEOUT,
            f"PostgreSQL at {where} did not answer within {timeout:g}s: check the host and "
            "port, and that the network lets the operator reach the server",
        )
    if isinstance(exc, ConnectionRefusedError):
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"PostgreSQL at {block.host}:{block.port} refused the connection: check that the "
            "server runs and listens there, and spec.postgres.host and port",
        )
    if isinstance(exc, asyncpg.TooManyConnectionsError | asyncpg.CannotConnectNowError):
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"PostgreSQL at {where} cannot take a connection now; the check is retried",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach PostgreSQL at {where} ({type(exc).__name__}): check the host, port "
        "and that the server runs",
    )


def _is_tls_failure(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return True
    # asyncpg's own words when the server answers "no TLS here" to an SSLRequest.
    return isinstance(exc, ConnectionError) and "SSL" in str(exc)


def _tls_problem(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return base.tls_problem(exc)
    return "the server does not offer TLS"


async def check(
    block: integration.Postgres,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each network exchange, not the coroutine
    policy: egress.Policy,
) -> base.Checked:
    """Connect, run ``SELECT 1`` and read the server's version."""
    user = creds.require("username")
    password = creds.require("password")
    way = _transport(block, creds)
    destination = await policy.destination(host(block), block.port, field=HOST_FIELD)

    async def connect(ssl_arg: ssl.SSLContext | bool | str | None) -> Any:
        return await asyncpg.connect(
            host=destination.address,
            port=block.port,
            user=user,
            password=password,
            database=block.database,
            ssl=ssl_arg,
            timeout=timeout,
            command_timeout=timeout,
            server_settings={"application_name": APPLICATION_NAME},
        )

    try:
        try:
            conn = await connect(way.ssl)
        except ConnectionError as exc:
            # prefer with a CA: a server without TLS is used in plaintext, and said so.
            if not (way.plaintext_fallback and refused_tls(exc)):
                raise
            conn = await connect(False)
    except Exception as exc:
        raise error_for(exc, block=block, creds=creds, timeout=timeout) from None
    try:
        one = await conn.fetchval("SELECT 1")
        version = await conn.fetchval("SHOW server_version")
        encrypted = await is_encrypted(conn)
    except Exception as exc:
        raise error_for(exc, block=block, creds=creds, timeout=timeout) from None
    finally:
        await _close(conn, wait=timeout)
    if one != 1:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the server at {target(block)} did not answer SELECT 1 with 1: is it PostgreSQL?",
        )
    return base.Checked(
        server_version=base.version(version),
        detail=f"connected to {target(block)}",
        transport=base.transport_of(encrypted=encrypted, verified=way.verified),
    )


async def _close(conn: asyncpg.Connection, *, wait: float) -> None:
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=wait)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        conn.terminate()


def uri(block: integration.Postgres, *, username: str, password: str) -> str:
    """A libpq connection URI (``postgresql://user:password@host:port/db?sslmode=…``)."""
    quote = urllib.parse.quote
    host = f"[{block.host}]" if ":" in block.host and not block.host.startswith("[") else block.host
    return (
        f"postgresql://{quote(username, safe='')}:{quote(password, safe='')}@{host}:{block.port}"
        f"/{quote(block.database, safe='')}?sslmode={block.ssl_mode}"
    )


def binding(block: integration.Postgres, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: libpq's pieces, one URI, and the CA when there is one."""
    username = creds.require("username")
    password = creds.require("password")
    data = {
        "type": "postgres",
        "provider": PROVIDER,
        "host": block.host,
        "port": str(block.port),
        "database": block.database,
        "username": username,
        "password": password,
        "sslMode": block.ssl_mode,
        "uri": uri(block, username=username, password=password),
    }
    ca = creds.get("ca_cert")
    if ca:
        data["ca.crt"] = ca
    return data
