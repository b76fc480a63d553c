"""Redis: connect with redis.asyncio as the agents will, PING, and read the version.

Named ``redis_store`` so that it never shadows the ``redis`` package itself. The
client is built with retries switched off: a check reports the first failure, and the
operator's own schedule decides when to try again.
"""

from __future__ import annotations

import functools
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, lazy

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis import backoff as redis_backoff
    from redis import exceptions as redis_errors
    from redis.asyncio import retry as redis_retry
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")
    redis_backoff = lazy.module("redis.backoff")
    redis_errors = lazy.module("redis.exceptions")
    redis_retry = lazy.module("redis.asyncio.retry")

PROVIDER = "redis"
HOST_FIELD = "spec.redis.host"

# What Redis answers (in one spelling or another) when the credentials are wrong,
# missing, or not allowed to run the check's commands.
_AUTH_WORDS = (
    "WRONGPASS",
    "NOAUTH",
    "NOPERM",
    "invalid username-password",
    "without any password configured",
    "Authentication required",
    "HELLO must be called with the client already authenticated",
)


def target(block: integration.Redis) -> str:
    return f"{block.host}:{block.port}"


def password(creds: base.Credentials) -> str | None:
    """The password: required from a referenced Secret, none without a secretRef.

    A Redis without authentication needs no Secret at all; once spec.secretRef names
    one, its password key must be there (a missing key is a mistake to report, not a
    reason to try without a password).
    """
    if creds.secret_name is None:
        return creds.get("password") or None
    return creds.require("password")


@functools.cache
def _pinned_ssl_connection() -> type[aioredis.SSLConnection]:
    """The connection class for TLS, defined on first use (redis is imported lazily)."""

    class PinnedSSLConnection(aioredis.SSLConnection):
        """A TLS connection to the judged address that verifies the configured name.

        redis-py opens the socket to its ``host`` and, for TLS, names that same host to
        the handshake; the pool is given the judged address as ``host``, and this class
        hands the handshake the name instead (asyncio's ``server_hostname``).
        """

        def __init__(self, *, server_hostname: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.server_hostname = server_hostname

        def _connection_arguments(self) -> Mapping[str, Any]:
            return {**super()._connection_arguments(), "server_hostname": self.server_hostname}

    return PinnedSSLConnection


def client(
    block: integration.Redis,
    creds: base.Credentials,
    *,
    timeout: float,
    destination: egress.Destination,
) -> aioredis.Redis:
    """A client for one check: TLS and ACL user per the block, no retries, one socket
    to the judged address."""
    options: dict[str, Any] = {
        "host": destination.address,
        "port": destination.port,
        "db": block.db,
        "username": block.username,
        "password": password(creds),
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": redis_retry.Retry(redis_backoff.NoBackoff(), 0),
    }
    if block.tls:
        ca = creds.get("ca_cert")
        pool = aioredis.ConnectionPool(
            connection_class=_pinned_ssl_connection(),
            server_hostname=destination.host,
            ssl_ca_data=ca or None,
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            **options,
        )
    else:
        pool = aioredis.ConnectionPool(**options)
    return aioredis.Redis(connection_pool=pool, single_connection_client=True)


def error_for(
    exc: BaseException, *, block: integration.Redis, creds: base.Credentials, timeout: float
) -> base.CheckError:
    """The CheckError for anything redis-py or the network raised during the check.

    What Redis answered decides the reason (WRONGPASS, NOPERM…) but is never quoted.
    """
    if isinstance(exc, base.CheckError):
        return exc
    where = target(block)
    text = str(exc)
    who = f"the ACL user {block.username!r}" if block.username else "the default user"
    if isinstance(exc, redis_errors.AuthenticationError | redis_errors.NoPermissionError) or (
        isinstance(exc, redis_errors.ResponseError) and any(w in text for w in _AUTH_WORDS)
    ):
        if isinstance(exc, redis_errors.NoPermissionError) or "NOPERM" in text:
            return base.CheckError(
                base.Reason.AUTHENTICATION_FAILED,
                f"Redis at {where} denied {who} a command: allow it PING and INFO in the "
                "server's ACL",
            )
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Redis at {where} refused to authenticate {who}: put the right password in key "
            f"{creds.key('password')!r} of the credentials Secret"
            + ("" if block.username else ", and set spec.redis.username for an ACL user"),
        )
    if isinstance(exc, redis_errors.ResponseError) and "DB index is out of range" in text:
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Redis at {where} has no database {block.db}: lower spec.redis.db below the "
            "server's 'databases' setting",
        )
    if _is_tls_failure(exc):
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with Redis at {where} failed ({base.tls_problem(exc)}): check that the "
            f"server speaks TLS and presents a certificate for {block.host!r} signed by a CA "
            f"the operator trusts (key {creds.key('ca_cert')!r} of the credentials Secret), "
            "or set spec.redis.tls to false",
        )
    if isinstance(exc, redis_errors.TimeoutError | TimeoutError):
        hint = (
            " (with spec.redis.tls set, a server without TLS also looks like this)"
            if block.tls
            else ""
        )
        return base.CheckError(
            base.Reason.TIMEOUT,
            f"Redis at {where} did not answer within {timeout:g}s{hint}: check the host and "
            "port, and that the network lets the operator reach the server",
        )
    if base.caused_by(exc, ConnectionRefusedError) or "Error 111 " in text:
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"Redis at {where} refused the connection: check that the server runs and "
            "listens there, and spec.redis.host and port",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach Redis at {where} ({type(exc).__name__}): check spec.redis.host and "
        "port, and that the server runs",
    )


def _is_tls_failure(exc: BaseException) -> bool:
    return base.caused_by(exc, ssl.SSLError) or "SSL" in str(exc) or "certificate" in str(exc)


async def check(
    block: integration.Redis,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each network exchange, not the coroutine
    policy: egress.Policy,
) -> base.Checked:
    """PING, then ``INFO server`` for ``redis_version``."""
    password(creds)  # a missing key is reported before anything is resolved
    destination = await policy.destination(
        block.host.removeprefix("[").removesuffix("]"), block.port, field=HOST_FIELD
    )
    conn = client(block, creds, timeout=timeout, destination=destination)
    try:
        pong = await conn.ping()
        info = await conn.info("server")
    except Exception as exc:
        raise error_for(exc, block=block, creds=creds, timeout=timeout) from None
    finally:
        await conn.aclose()
    if not pong:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the server at {target(block)} did not answer PING: is it Redis?",
        )
    return base.Checked(
        server_version=base.version(info.get("redis_version")),
        detail=f"connected to {target(block)} db {block.db}",
        # redis-py checks the chain and the host name of a TLS connection by default.
        transport=base.transport_of(encrypted=block.tls, verified=block.tls),
    )


def uri(block: integration.Redis, *, password: str | None) -> str:
    """``redis[s]://[user:password@]host:port/db``, as redis clients take it."""
    quote = urllib.parse.quote
    scheme = "rediss" if block.tls else "redis"
    userinfo = ""
    if block.username or password:
        userinfo = quote(block.username or "", safe="")
        if password:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    host = f"[{block.host}]" if ":" in block.host and not block.host.startswith("[") else block.host
    return f"{scheme}://{userinfo}{host}:{block.port}/{block.db}"


def binding(block: integration.Redis, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: host, port, database, TLS, credentials and one URI."""
    secret = creds.get("password") or None
    data = {
        "type": "redis",
        "provider": PROVIDER,
        "host": block.host,
        "port": str(block.port),
        "database": str(block.db),
        "tls": "true" if block.tls else "false",
        "uri": uri(block, password=secret),
    }
    if block.username:
        data["username"] = block.username
    if secret:
        data["password"] = secret
    ca = creds.get("ca_cert")
    if ca and block.tls:
        data["ca.crt"] = ca
    return data
