"""Who is calling: Bearer JWTs verified against the auth0 Integration's signing keys.

Callers present access tokens issued by the OIDC issuer of the Agent's ``auth0``
Integration (Auth0 or any issuer that signs with RS256 and publishes a JWKS). The
runtime trusts nothing in a token until its signature verifies with one of the
issuer's published RSA keys, and even then only with the algorithm that key is
pinned to: a token's header chooses neither the key type nor the algorithm. That
closes the classic confusions: ``alg: none``, and an HS256 token whose HMAC secret is
the (public) RSA key.

The JWK set is fetched from the binding's ``jwksUri`` (or, without one, from the
``jwks_uri`` of the issuer's OpenID discovery document), cached, and fetched again
when a token names a key id the cache does not know (the issuer rotated its keys)
or when the cached set grows old (a revoked key disappears). Every fetch, failed or
not, starts a minimum interval during which no other fetch happens, so a flood of
tokens with made-up key ids cannot turn the runtime against the issuer. While the
issuer cannot be reached, the cached keys serve on, but only up to ``max_stale_age``
after the last good fetch: then they are dropped and tokens are refused with 503
until a fetch succeeds, so a key the issuer revoked during an outage of its JWKS
does not stay trusted for ever.

Every refusal is a `ports.AuthError` with an HTTP status (401 for a token that
does not prove who is calling, 403 for a caller who may not do this, 503 when the
keys cannot be had) and a stable code; its message says what is wrong and what to
do, and never quotes the token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
from jose import exceptions as jose_errors
from jose import jws

from bmad_runtime import bindings, jwks, ports

log = logging.getLogger(__name__)

TENANT_CLAIM: Final = "https://bmad.dev/tenant"
"""The default claim that names the caller's tenant (an Auth0 namespaced custom claim)."""
FALLBACK_TENANT_CLAIM: Final = "tenant"
"""Read when the configured tenant claim is absent."""
ALGORITHMS: Final = jwks.ALGORITHMS
"""The only signature algorithms a key from the JWKS may be pinned to."""
DISCOVERY_PATH: Final = ".well-known/openid-configuration"

DEFAULT_LEEWAY: Final = 30.0
"""Seconds of clock skew tolerated on ``exp`` and ``nbf``."""
DEFAULT_MIN_REFRESH_INTERVAL: Final = 10.0
"""Seconds that must pass between two fetches of the JWK set."""
DEFAULT_MAX_KEY_AGE: Final = 3600.0
"""Seconds after which the cached JWK set is fetched again on the next request."""
DEFAULT_MAX_STALE_AGE: Final = 4 * 3600.0
"""Seconds after its last good fetch beyond which the cached JWK set is no longer used,
even when no fetch succeeds (tokens are refused with 503 until one does)."""
DEFAULT_TIMEOUT: Final = 5.0

# Error codes (AuthError.code). 401: the token does not prove who is calling.
MISSING_TOKEN: Final = "missing_token"  # noqa: S105 - an error code
INVALID_TOKEN: Final = "invalid_token"  # noqa: S105 - an error code
TOKEN_EXPIRED: Final = "token_expired"  # noqa: S105 - an error code
TOKEN_NOT_YET_VALID: Final = "token_not_yet_valid"  # noqa: S105 - an error code
WRONG_AUDIENCE: Final = "wrong_audience"
WRONG_ISSUER: Final = "wrong_issuer"
UNKNOWN_KEY: Final = "unknown_key"
BAD_ALGORITHM: Final = "bad_algorithm"
# 403: the caller is known but may not do this.
WRONG_TENANT: Final = "wrong_tenant"
INSUFFICIENT_SCOPE: Final = "insufficient_scope"
# 503: the runtime cannot verify anything right now.
AUTH_UNAVAILABLE: Final = "auth_unavailable"


def _unauthorized(code: str, message: str) -> ports.AuthError:
    return ports.AuthError(401, code, message)


def _forbidden(code: str, message: str) -> ports.AuthError:
    return ports.AuthError(403, code, message)


_shown = jwks.shown


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    fix = "send the header 'Authorization: Bearer <access token>'"
    if authorization is None or not authorization.strip():
        raise _unauthorized(MISSING_TOKEN, f"no access token: {fix}")
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _unauthorized(
            INVALID_TOKEN, f"the Authorization header does not use the Bearer scheme: {fix}"
        )
    token = rest.strip()
    if not token:
        raise _unauthorized(MISSING_TOKEN, f"the Authorization header holds no token: {fix}")
    if any(c.isspace() for c in token) or token.count(".") != 2:
        raise _unauthorized(
            INVALID_TOKEN,
            "the bearer token is not a signed JWT (three base64url parts joined by dots)",
        )
    return token


def require_scope(principal: ports.Principal, scope: str) -> None:
    """Refuse (403 ``insufficient_scope``) a caller whose token does not grant ``scope``."""
    if scope not in principal.scopes:
        raise _forbidden(
            INSUFFICIENT_SCOPE,
            f"this call needs the scope {scope!r}, which the token does not grant: ask the "
            "issuer for a token with that scope (or permission)",
        )


def challenge(error: ports.AuthError) -> str:
    """The ``WWW-Authenticate`` value (RFC 6750 §3) to send along with a refusal."""
    if error.code == MISSING_TOKEN:
        return "Bearer"  # no credentials were sent: no error attribute (RFC 6750 §3.1)
    if error.code == INSUFFICIENT_SCOPE:
        kind = "insufficient_scope"
    elif error.status == 401:
        kind = "invalid_token"
    else:
        return "Bearer"
    description = error.message.replace("\\", "\\\\").replace('"', '\\"')
    return f'Bearer error="{kind}", error_description="{description}"'


class JwtAuthenticator:
    """`ports.Authenticator` for Bearer JWTs of one issuer and audience, for one tenant."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        tenant: str,
        jwks_uri: str | None = None,
        http: httpx.AsyncClient | None = None,
        tenant_claim: str = TENANT_CLAIM,
        leeway: float = DEFAULT_LEEWAY,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL,
        max_key_age: float = DEFAULT_MAX_KEY_AGE,
        max_stale_age: float = DEFAULT_MAX_STALE_AGE,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not issuer or not audience or not tenant:
            raise ValueError("issuer, audience and tenant must all be set")
        if leeway < 0 or min_refresh_interval < 0 or max_key_age <= 0:
            raise ValueError("leeway and min_refresh_interval must be >= 0, max_key_age > 0")
        if max_stale_age < max_key_age:
            raise ValueError("max_stale_age must be at least max_key_age")
        self.issuer = issuer
        self.audience = audience
        self.tenant = tenant
        self.tenant_claim = tenant_claim
        self.leeway = leeway
        self.min_refresh_interval = min_refresh_interval
        self.max_key_age = max_key_age
        self.max_stale_age = max_stale_age
        self._jwks_uri = jwks_uri or None
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        self._clock = clock
        self._monotonic = monotonic
        self._keys: dict[str | None, jwks.SigningKey] | None = None
        self._fetched_at: float | None = None  # monotonic time of the last good fetch
        self._attempted_at: float | None = None  # ... and of the last attempt
        self._lock = asyncio.Lock()
        self.fetches = 0  # how many times the JWK set was requested (for metrics and tests)

    @classmethod
    def from_settings(
        cls,
        auth0: bindings.Auth0Settings,
        *,
        tenant: str,
        http: httpx.AsyncClient | None = None,
        tenant_claim: str = TENANT_CLAIM,
        leeway: float = DEFAULT_LEEWAY,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL,
        max_key_age: float = DEFAULT_MAX_KEY_AGE,
        max_stale_age: float = DEFAULT_MAX_STALE_AGE,
    ) -> JwtAuthenticator:
        """The authenticator of an ``auth0`` binding, for the agent's tenant."""
        return cls(
            issuer=auth0.issuer,
            audience=auth0.audience,
            tenant=tenant,
            jwks_uri=auth0.jwks_uri or None,
            http=http,
            tenant_claim=tenant_claim,
            leeway=leeway,
            min_refresh_interval=min_refresh_interval,
            max_key_age=max_key_age,
            max_stale_age=max_stale_age,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this authenticator made it."""
        if self._owns_http:
            await self._http.aclose()

    async def authenticate(self, authorization: str | None) -> ports.Principal:
        token = bearer_token(authorization)
        try:
            header = jws.get_unverified_header(token)
        except (jose_errors.JOSEError, ValueError, TypeError, UnicodeError):
            raise _unauthorized(
                INVALID_TOKEN, "the bearer token is not a JWT: its header does not decode"
            ) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise _unauthorized(
                BAD_ALGORITHM,
                f"the token is signed with alg {_shown(algorithm)}; this API accepts "
                f"{', '.join(sorted(ALGORITHMS))} tokens from {self.issuer} only",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _unauthorized(INVALID_TOKEN, "the token's header has a kid that is not a string")
        key = await self._key(kid)
        if algorithm != key.algorithm:
            raise _unauthorized(
                BAD_ALGORITHM,
                f"the token says alg {_shown(algorithm)} but its key is for {key.algorithm}",
            )
        try:
            payload = jws.verify(token, key.key, algorithms=[key.algorithm])
        except (jose_errors.JOSEError, ValueError, TypeError):
            raise _unauthorized(
                INVALID_TOKEN,
                f"the token's signature does not verify with the key it names ({_shown(kid)})",
            ) from None
        try:
            claims = json.loads(payload)
        except (ValueError, UnicodeError):
            claims = None
        if not isinstance(claims, dict):
            raise _unauthorized(INVALID_TOKEN, "the token's payload is not a JSON object")
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> ports.Principal:
        """The caller, once the claims say this token is for this API, now, for this tenant."""
        if claims.get("iss") != self.issuer:
            raise _unauthorized(
                WRONG_ISSUER,
                f"the token was not issued by {self.issuer}: get a token from that issuer",
            )
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or self.audience not in audiences:
            raise _unauthorized(
                WRONG_AUDIENCE,
                f"the token is not meant for this API: request one for the audience "
                f"{self.audience!r}",
            )
        now = self._clock()
        expires = self._time_claim(claims, "exp")
        if expires is None:
            raise _unauthorized(INVALID_TOKEN, "the token has no expiry (exp claim)")
        if now > expires + self.leeway:
            raise _unauthorized(
                TOKEN_EXPIRED, f"the token expired at {_utc(expires)}: get a new token"
            )
        not_before = self._time_claim(claims, "nbf")
        if not_before is not None and now + self.leeway < not_before:
            raise _unauthorized(
                TOKEN_NOT_YET_VALID,
                f"the token is not valid before {_utc(not_before)}: check the clock of the "
                "machine that issued it, or wait",
            )
        self._time_claim(claims, "iat")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _unauthorized(INVALID_TOKEN, "the token names no subject (sub claim)")
        tenant = claims.get(self.tenant_claim, claims.get(FALLBACK_TENANT_CLAIM))
        if tenant != self.tenant:
            named = "names no tenant" if tenant is None else "is for another tenant"
            raise _forbidden(
                WRONG_TENANT,
                f"the token {named} (claim {self.tenant_claim!r}); this agent serves tenant "
                f"{self.tenant!r} only",
            )
        return ports.Principal(subject=subject, tenant=self.tenant, scopes=_scopes(claims))

    @staticmethod
    def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
        """A NumericDate claim (seconds since the epoch), None when absent."""
        value = claims.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _unauthorized(
                INVALID_TOKEN, f"the token's {name} claim is not a time (seconds since the epoch)"
            )
        return float(value)

    async def _key(self, kid: str | None) -> jwks.SigningKey:
        """The key a token names: from the cache, or from the JWK set fetched anew."""
        if self._keys is None or self._stale():
            await self._refresh()
        key = self._lookup(kid)
        if key is None and self._keys is not None:
            await self._refresh()  # perhaps the issuer rotated its keys
            key = self._lookup(kid)
        if self._keys is not None and self._too_old():
            # No fetch has succeeded for max_stale_age: trust these keys no longer.
            log.warning(
                "Dropping the signing keys of %s: none could be fetched for %ss",
                self.issuer,
                int(self.max_stale_age),
            )
            self._keys, key = None, None
        if self._keys is None:
            raise ports.AuthError(
                503,
                AUTH_UNAVAILABLE,
                f"the signing keys of {self.issuer} could not be fetched, so no token can be "
                "verified now: try again shortly (the agent's logs say why)",
            )
        if key is None:
            which = "names no key id" if kid is None else f"names the key id {_shown(kid)}"
            raise _unauthorized(
                UNKNOWN_KEY,
                f"the token {which}, which is not among the signing keys of {self.issuer}",
            )
        return key

    def _lookup(self, kid: str | None) -> jwks.SigningKey | None:
        if self._keys is None:
            return None
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # an issuer with one key may omit kids
        return self._keys.get(kid)

    def _stale(self) -> bool:
        return (
            self._fetched_at is not None
            and self._monotonic() - self._fetched_at >= self.max_key_age
        )

    def _too_old(self) -> bool:
        return (
            self._fetched_at is not None
            and self._monotonic() - self._fetched_at >= self.max_stale_age
        )

    async def _refresh(self) -> None:
        """Fetch the JWK set, unless a fetch started less than the minimum interval ago."""
        async with self._lock:
            now = self._monotonic()
            if (
                self._attempted_at is not None
                and now - self._attempted_at < self.min_refresh_interval
            ):
                return  # a fetch just happened (perhaps by a request we queued behind)
            self._attempted_at = now
            try:
                keys = await self._fetch()
            except jwks.FetchError as exc:
                kept = "keeping the cached keys" if self._keys is not None else "no keys yet"
                log.warning(
                    "Fetching the signing keys of %s failed (%s): %s", self.issuer, kept, exc
                )
                return
            if not keys:
                log.warning("The JWK set of %s holds no RSA signing key", self.issuer)
            self._keys = keys
            self._fetched_at = self._monotonic()
            log.info("Fetched %d signing key(s) of %s", len(keys), self.issuer)

    async def _fetch(self) -> dict[str | None, jwks.SigningKey]:
        if self._jwks_uri is None:
            self._jwks_uri = await self._discover()
        self.fetches += 1
        return jwks.signing_keys(await self._get_json(self._jwks_uri), self._jwks_uri)

    async def _discover(self) -> str:
        url = f"{self.issuer.rstrip('/')}/{DISCOVERY_PATH}"
        document = await self._get_json(url)
        uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(uri, str) or not uri:
            raise jwks.FetchError(f"the OpenID configuration at {url} names no jwks_uri")
        return uri

    async def _get_json(self, url: str) -> object:
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise jwks.FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise jwks.FetchError(f"GET {url} answered HTTP {response.status_code}")
        try:
            document: object = response.json()
        except ValueError:
            raise jwks.FetchError(f"GET {url} did not answer with JSON") from None
        return document


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth scopes (``scope``, space-separated) and Auth0 RBAC ``permissions`` (a list)."""
    granted: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        granted.update(scope.split())
    permissions = claims.get("permissions")
    if isinstance(permissions, list):
        granted.update(p for p in permissions if isinstance(p, str) and p)
    return frozenset(granted)


def _utc(timestamp: float) -> str:
    try:
        moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{timestamp:.0f} (seconds since the epoch)"
    return moment.isoformat(timespec="seconds")
