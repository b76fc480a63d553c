"""Redis: connect with redis.asyncio as the agents will, PING, and read the version.

Named ``redis_store`` so that it never shadows the ``redis`` package itself. The
client is built with retries switched off: a check reports the first failure, and the
operator's own schedule decides when to try again.
"""

from __future__ import annotations

import socket
import ssl
import urllib.parse

import redis.asyncio as aioredis
from redis import backoff as redis_backoff
from redis import exceptions as redis_errors
from redis.asyncio import retry as redis_retry

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base

PROVIDER = "redis"

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


def client(block: integration.Redis, creds: base.Credentials, *, timeout: float) -> aioredis.Redis:
    """A client for one check: TLS and ACL user per the block, no retries."""
    ca = creds.get("ca_cert")
    return aioredis.Redis(
        host=block.host.removeprefix("[").removesuffix("]"),
        port=block.port,
        db=block.db,
        username=block.username,
        password=password(creds),
        ssl=block.tls,
        ssl_ca_data=ca if block.tls and ca else None,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=redis_retry.Retry(redis_backoff.NoBackoff(), 0),
        single_connection_client=True,
    )


def error_for(
    exc: BaseException, *, block: integration.Redis, creds: base.Credentials, timeout: float
) -> base.CheckError:
    """The CheckError for anything redis-py or the network raised during the check."""
    if isinstance(exc, base.CheckError):
        return exc
    where = target(block)
    detail = base.said(exc, creds)
    text = str(exc)
    who = f"the ACL user {block.username!r}" if block.username else "the default user"
    if isinstance(exc, redis_errors.AuthenticationError | redis_errors.NoPermissionError) or (
        isinstance(exc, redis_errors.ResponseError) and any(w in text for w in _AUTH_WORDS)
    ):
        if isinstance(exc, redis_errors.NoPermissionError) or "NOPERM" in text:
            return base.CheckError(
                base.Reason.AUTHENTICATION_FAILED,
                f"Redis at {where} denied {who} a command ({detail}): allow it PING and INFO "
                "in the server's ACL",
            )
        return base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"Redis at {where} refused to authenticate {who} ({detail}): put the right "
            f"password in key {creds.key('password')!r} of the credentials Secret"
            + ("" if block.username else ", and set spec.redis.username for an ACL user"),
        )
    if isinstance(exc, redis_errors.ResponseError) and "DB index is out of range" in text:
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"Redis at {where} has no database {block.db} ({detail}): lower spec.redis.db "
            "below the server's 'databases' setting",
        )
    if _is_tls_failure(exc):
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with Redis at {where} failed ({detail}): check that the server speaks TLS "
            f"and presents a certificate for {block.host!r} signed by a CA the operator "
            f"trusts (key {creds.key('ca_cert')!r} of the credentials Secret), "
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
    if _caused_by(exc, socket.gaierror) or "Name or service not known" in text:
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"cannot resolve the host {block.host!r} ({detail}): fix spec.redis.host",
        )
    if _caused_by(exc, ConnectionRefusedError) or "Error 111 " in text:
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"Redis at {where} refused the connection: check that the server runs and "
            "listens there, and spec.redis.host and port",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach Redis at {where} ({type(exc).__name__}: {detail}): check the host, "
        "port and that the server runs",
    )


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _is_tls_failure(exc: BaseException) -> bool:
    return _caused_by(exc, ssl.SSLError) or "SSL" in str(exc) or "certificate" in str(exc)


async def check(
    block: integration.Redis,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each network exchange, not the coroutine
) -> base.Checked:
    """PING, then ``INFO server`` for ``redis_version``."""
    conn = client(block, creds, timeout=timeout)
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
    version = info.get("redis_version")
    return base.Checked(
        server_version=str(version) if version is not None else None,
        detail=f"connected to {target(block)} db {block.db}",
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
