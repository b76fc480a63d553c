"""The JWT suite: `auth.JwtAuthenticator` against a JWKS served by an httpx MockTransport.

Keys are real RSA keys made with `cryptography`; tokens are signed with python-jose
(or, for the forgeries, by hand). A fake monotonic clock drives the JWKS refresh
interval, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jws, jwt

from bmad_runtime import auth, bindings, ports

pytestmark = pytest.mark.unit

ISSUER = "https://issuer.bmad.test/"
AUDIENCE = "https://agents.bmad.test"
TENANT = "acme"
JWKS_URI = "https://issuer.bmad.test/.well-known/jwks.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class Signer:
    """An RSA key pair: its public JWK, its PEMs, and a way to sign tokens with it."""

    kid: str
    private: rsa.RSAPrivateKey = field(repr=False)

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self, **extra: str) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": b64uint(numbers.n),
            "e": b64uint(numbers.e),
            **extra,
        }

    def sign(self, claims: dict[str, Any], *, kid: str | None = "same") -> str:
        headers = {} if kid is None else {"kid": self.kid if kid == "same" else kid}
        token: str = jwt.encode(claims, self.private_pem.decode(), "RS256", headers=headers)
        return token


def make_signer(kid: str) -> Signer:
    return Signer(kid=kid, private=rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def key() -> Signer:
    return make_signer("key-1")


@pytest.fixture(scope="module")
def other_key() -> Signer:
    return make_signer("key-2")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "auth0|alice",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        auth.TENANT_CLAIM: TENANT,
        "scope": "openid agents:invoke",
        "permissions": ["conversations:read"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hand_made(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A JWS assembled without a library, for the forgeries a library would refuse to make."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(payload).encode())
    return f"{head}.{body}.{b64url(signature)}"


class Issuer:
    """The issuer's HTTP side: discovery and JWKS, counting every JWKS request."""

    def __init__(self, keys: list[dict[str, str]]) -> None:
        self.keys = keys
        self.jwks_requests = 0
        self.discovery_requests = 0
        self.status = 200

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            self.discovery_requests += 1
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": JWKS_URI})
        if str(request.url) == JWKS_URI:
            self.jwks_requests += 1
            if self.status != 200:
                return httpx.Response(self.status, text="unavailable")
            return httpx.Response(200, json={"keys": list(self.keys)})
        return httpx.Response(404)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def issuer(key: Signer) -> Issuer:
    return Issuer([key.jwk()])


@pytest.fixture
def monotonic() -> Clock:
    return Clock()


@pytest.fixture
async def http(issuer: Issuer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handler)) as client:
        yield client


@pytest.fixture
def authenticator(http: httpx.AsyncClient, monotonic: Clock) -> auth.JwtAuthenticator:
    return auth.JwtAuthenticator(
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant=TENANT,
        jwks_uri=JWKS_URI,
        http=http,
        min_refresh_interval=5.0,
        monotonic=monotonic,
    )


async def refused(
    authenticator: auth.JwtAuthenticator, token: str | None, *, status: int, code: str
) -> ports.AuthError:
    header = None if token is None else f"Bearer {token}"
    with pytest.raises(ports.AuthError) as caught:
        await authenticator.authenticate(header)
    error = caught.value
    assert (error.status, error.code) == (status, code), error.message
    assert error.message
    assert str(error) == error.message
    if token:
        assert token not in error.message
        for part in token.split("."):
            if len(part) > 8:
                assert part not in error.message
    return error


# --- the token that passes -------------------------------------------------------------


async def test_a_valid_token_gives_the_principal_with_scopes_and_permissions(
    authenticator: auth.JwtAuthenticator, key: Signer, issuer: Issuer
) -> None:
    principal = await authenticator.authenticate(f"Bearer {key.sign(claims())}")
    assert principal == ports.Principal(
        subject="auth0|alice",
        tenant=TENANT,
        scopes=frozenset({"openid", "agents:invoke", "conversations:read"}),
    )
    # Cached: a second token needs no second fetch.
    await authenticator.authenticate(f"bearer {key.sign(claims(sub='bob'))}")
    assert issuer.jwks_requests == 1
    assert authenticator.fetches == 1


async def test_an_audience_list_that_includes_ours_passes(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    token = key.sign(claims(aud=["https://other.api", AUDIENCE]))
    assert (await authenticator.authenticate(f"Bearer {token}")).subject == "auth0|alice"


async def test_the_fallback_tenant_claim_is_read_when_the_namespaced_one_is_absent(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    token = key.sign(claims(**{auth.TENANT_CLAIM: None, "tenant": TENANT}))
    assert (await authenticator.authenticate(f"Bearer {token}")).tenant == TENANT


async def test_the_tenant_claim_name_is_configurable(http: httpx.AsyncClient, key: Signer) -> None:
    authenticator = auth.JwtAuthenticator(
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant=TENANT,
        jwks_uri=JWKS_URI,
        http=http,
        tenant_claim="org_id",
    )
    token = key.sign(claims(**{auth.TENANT_CLAIM: None, "org_id": TENANT}))
    assert (await authenticator.authenticate(f"Bearer {token}")).tenant == TENANT
    await refused(
        authenticator, key.sign(claims(org_id="other")), status=403, code=auth.WRONG_TENANT
    )


async def test_a_token_a_little_past_expiry_passes_within_the_leeway(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    now = int(time.time())
    token = key.sign(claims(exp=now - 5, nbf=now + 5))
    assert (await authenticator.authenticate(f"Bearer {token}")).subject == "auth0|alice"


async def test_a_token_without_kid_is_verified_with_the_only_key(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    token = key.sign(claims(), kid=None)
    assert (await authenticator.authenticate(f"Bearer {token}")).subject == "auth0|alice"


async def test_from_settings_reads_the_binding(http: httpx.AsyncClient, key: Signer) -> None:
    settings = bindings.Auth0Settings(issuer=ISSUER, audience=AUDIENCE, jwks_uri=JWKS_URI)
    authenticator = auth.JwtAuthenticator.from_settings(
        settings, tenant=TENANT, http=http, leeway=0
    )
    assert (authenticator.issuer, authenticator.audience) == (ISSUER, AUDIENCE)
    assert authenticator.leeway == 0
    assert (await authenticator.authenticate(f"Bearer {key.sign(claims())}")).tenant == TENANT


async def test_without_a_jwks_uri_the_discovery_document_names_it(
    http: httpx.AsyncClient, issuer: Issuer, key: Signer
) -> None:
    settings = bindings.Auth0Settings(issuer=ISSUER, audience=AUDIENCE, jwks_uri="")
    authenticator = auth.JwtAuthenticator.from_settings(settings, tenant=TENANT, http=http)
    await authenticator.authenticate(f"Bearer {key.sign(claims())}")
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)


# --- tokens that are refused ------------------------------------------------------------


async def test_an_expired_token_is_401_token_expired(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    now = int(time.time())
    error = await refused(
        authenticator,
        key.sign(claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600)),
        status=401,
        code=auth.TOKEN_EXPIRED,
    )
    assert "expired" in error.message


async def test_a_token_not_yet_valid_is_401_token_not_yet_valid(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    now = int(time.time())
    await refused(
        authenticator,
        key.sign(claims(nbf=now + 600, exp=now + 1200)),
        status=401,
        code=auth.TOKEN_NOT_YET_VALID,
    )


async def test_a_token_without_expiry_is_401_invalid_token(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    await refused(authenticator, key.sign(claims(exp=None)), status=401, code=auth.INVALID_TOKEN)
    await refused(
        authenticator, key.sign(claims(exp="tomorrow")), status=401, code=auth.INVALID_TOKEN
    )


async def test_a_wrong_audience_is_401_wrong_audience(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    error = await refused(
        authenticator,
        key.sign(claims(aud="https://another.api")),
        status=401,
        code=auth.WRONG_AUDIENCE,
    )
    assert AUDIENCE in error.message  # says which audience to ask for
    await refused(authenticator, key.sign(claims(aud=None)), status=401, code=auth.WRONG_AUDIENCE)


async def test_a_wrong_issuer_is_401_wrong_issuer(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    await refused(
        authenticator,
        key.sign(claims(iss="https://evil.example/")),
        status=401,
        code=auth.WRONG_ISSUER,
    )


async def test_alg_none_is_401_bad_algorithm(
    authenticator: auth.JwtAuthenticator, key: Signer, issuer: Issuer
) -> None:
    for alg in ("none", "None", "NONE"):
        token = hand_made({"alg": alg, "typ": "JWT", "kid": key.kid}, claims())
        await refused(authenticator, token, status=401, code=auth.BAD_ALGORITHM)
    # Even with a signature part that happens to be a valid RS256 signature.
    genuine = key.sign(claims())
    forged = hand_made({"alg": "none", "kid": key.kid}, claims())
    forged = forged.rsplit(".", 1)[0] + "." + genuine.rsplit(".", 1)[1]
    await refused(authenticator, forged, status=401, code=auth.BAD_ALGORITHM)


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    # The algorithm-confusion forgery: the public key (which anyone can fetch from the
    # JWKS) used as an HMAC secret, hoping the verifier does the same.
    for secret in (key.public_pem, json.dumps(key.jwk()).encode()):
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        unsigned = hand_made(header, claims()).rsplit(".", 1)[0]
        mac = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
        await refused(
            authenticator, f"{unsigned}.{b64url(mac)}", status=401, code=auth.BAD_ALGORITHM
        )
    # Nor does claiming RS256 in the header with an HMAC in the signature get through.
    unsigned = hand_made({"alg": "RS256", "kid": key.kid}, claims()).rsplit(".", 1)[0]
    mac = hmac.new(key.public_pem, unsigned.encode(), hashlib.sha256).digest()
    await refused(authenticator, f"{unsigned}.{b64url(mac)}", status=401, code=auth.INVALID_TOKEN)


async def test_an_alg_that_is_not_a_string_is_refused(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    for alg in (["RS256"], {"RS256": 1}, None, 256):
        token = hand_made({"alg": alg, "kid": key.kid}, claims(), b"signature")
        await refused(authenticator, token, status=401, code=auth.BAD_ALGORITHM)


async def test_values_from_the_token_are_shown_ascii_only(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    token = key.sign(claims(), kid="k\u00e9y\r\nX-Injected: 1")
    error = await refused(authenticator, token, status=401, code=auth.UNKNOWN_KEY)
    assert error.message.isascii()
    for shown in (error.message, auth.challenge(error)):
        assert "\r" not in shown
        assert "\n" not in shown


async def test_other_asymmetric_algorithms_are_refused_too(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    token: str = jwt.encode(claims(), key.private_pem.decode(), "RS512", headers={"kid": key.kid})
    await refused(authenticator, token, status=401, code=auth.BAD_ALGORITHM)


async def test_a_tampered_payload_is_401_invalid_token(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    head, _, signature = key.sign(claims()).split(".")
    body = b64url(json.dumps(claims(sub="auth0|mallory", scope="admin")).encode())
    await refused(authenticator, f"{head}.{body}.{signature}", status=401, code=auth.INVALID_TOKEN)


async def test_a_token_signed_by_another_key_under_a_known_kid_is_invalid(
    authenticator: auth.JwtAuthenticator, key: Signer, other_key: Signer
) -> None:
    token = other_key.sign(claims(), kid=key.kid)
    await refused(authenticator, token, status=401, code=auth.INVALID_TOKEN)


async def test_a_wrong_tenant_is_403_wrong_tenant(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    error = await refused(
        authenticator,
        key.sign(claims(**{auth.TENANT_CLAIM: "globex"})),
        status=403,
        code=auth.WRONG_TENANT,
    )
    assert repr(TENANT) in error.message
    # A namespaced claim for another tenant is not overridden by the fallback claim.
    await refused(
        authenticator,
        key.sign(claims(**{auth.TENANT_CLAIM: "globex", "tenant": TENANT})),
        status=403,
        code=auth.WRONG_TENANT,
    )
    error = await refused(
        authenticator,
        key.sign(claims(**{auth.TENANT_CLAIM: None})),
        status=403,
        code=auth.WRONG_TENANT,
    )
    assert "names no tenant" in error.message


async def test_an_expired_token_of_another_tenant_is_401_not_403(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    now = int(time.time())
    token = key.sign(claims(exp=now - 3600, **{auth.TENANT_CLAIM: "globex"}))
    await refused(authenticator, token, status=401, code=auth.TOKEN_EXPIRED)


async def test_a_token_without_subject_is_invalid(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    await refused(authenticator, key.sign(claims(sub=None)), status=401, code=auth.INVALID_TOKEN)


# --- the key set: unknown kids, refresh, rate limit ------------------------------------


async def test_an_unknown_kid_refreshes_once_then_is_401_unknown_key(
    authenticator: auth.JwtAuthenticator,
    key: Signer,
    other_key: Signer,
    issuer: Issuer,
    monotonic: Clock,
) -> None:
    await authenticator.authenticate(f"Bearer {key.sign(claims())}")
    assert issuer.jwks_requests == 1
    monotonic.now += 60  # long after the first fetch: a refresh is allowed
    stranger = other_key.sign(claims())
    error = await refused(authenticator, stranger, status=401, code=auth.UNKNOWN_KEY)
    assert repr(other_key.kid) in error.message
    assert issuer.jwks_requests == 2  # refreshed once for the unknown kid
    # More unknown kids within the minimum interval: no more requests to the issuer.
    for n in range(5):
        monotonic.now += 0.5
        await refused(
            authenticator,
            other_key.sign(claims(), kid=f"made-up-{n}"),
            status=401,
            code=auth.UNKNOWN_KEY,
        )
    assert issuer.jwks_requests == 2
    monotonic.now += 5
    await refused(authenticator, stranger, status=401, code=auth.UNKNOWN_KEY)
    assert issuer.jwks_requests == 3


async def test_a_rotated_key_is_picked_up_by_the_refresh(
    authenticator: auth.JwtAuthenticator,
    key: Signer,
    other_key: Signer,
    issuer: Issuer,
    monotonic: Clock,
) -> None:
    await authenticator.authenticate(f"Bearer {key.sign(claims())}")
    issuer.keys = [key.jwk(), other_key.jwk()]  # the issuer rotates
    monotonic.now += 10
    principal = await authenticator.authenticate(f"Bearer {other_key.sign(claims())}")
    assert principal.subject == "auth0|alice"
    assert issuer.jwks_requests == 2
    # The rotated-out key stays usable until the set is fetched again.
    await authenticator.authenticate(f"Bearer {key.sign(claims())}")
    assert issuer.jwks_requests == 2


async def test_concurrent_unknown_kids_cause_one_fetch(
    authenticator: auth.JwtAuthenticator, key: Signer, other_key: Signer, issuer: Issuer
) -> None:
    tokens = [other_key.sign(claims(), kid=f"k{n}") for n in range(20)]

    async def attempt(token: str) -> str:
        try:
            await authenticator.authenticate(f"Bearer {token}")
        except ports.AuthError as error:
            return error.code
        return "ok"

    codes = await asyncio.gather(*(attempt(t) for t in tokens))
    assert set(codes) == {auth.UNKNOWN_KEY}
    assert issuer.jwks_requests == 1  # the first fetch counts: no refresh within the interval


async def test_an_old_key_set_is_fetched_again(
    http: httpx.AsyncClient, key: Signer, issuer: Issuer, monotonic: Clock
) -> None:
    authenticator = auth.JwtAuthenticator(
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant=TENANT,
        jwks_uri=JWKS_URI,
        http=http,
        max_key_age=300,
        monotonic=monotonic,
    )
    token = f"Bearer {key.sign(claims())}"
    await authenticator.authenticate(token)
    monotonic.now += 299
    await authenticator.authenticate(token)
    assert issuer.jwks_requests == 1
    issuer.keys = []  # the key was revoked
    monotonic.now += 2
    await refused(authenticator, token.split()[1], status=401, code=auth.UNKNOWN_KEY)
    assert issuer.jwks_requests == 2


async def test_an_unreachable_jwks_is_503_and_cached_keys_survive_a_failed_refresh(
    authenticator: auth.JwtAuthenticator,
    key: Signer,
    other_key: Signer,
    issuer: Issuer,
    monotonic: Clock,
) -> None:
    issuer.status = 500
    error = await refused(authenticator, key.sign(claims()), status=503, code=auth.AUTH_UNAVAILABLE)
    assert ISSUER in error.message
    await refused(authenticator, key.sign(claims()), status=503, code=auth.AUTH_UNAVAILABLE)
    assert issuer.jwks_requests == 1  # failures are rate-limited as well
    issuer.status = 200
    monotonic.now += 5
    await authenticator.authenticate(f"Bearer {key.sign(claims())}")
    assert issuer.jwks_requests == 2
    issuer.status = 500
    monotonic.now += 5
    await refused(authenticator, other_key.sign(claims()), status=401, code=auth.UNKNOWN_KEY)
    assert issuer.jwks_requests == 3
    await authenticator.authenticate(f"Bearer {key.sign(claims())}")  # still cached


async def test_symmetric_and_foreign_keys_in_the_jwks_are_never_used(
    http: httpx.AsyncClient, key: Signer, issuer: Issuer
) -> None:
    secret = b"a-shared-secret-of-32-bytes-long"
    issuer.keys = [
        {"kty": "oct", "kid": "hmac", "k": b64url(secret), "alg": "HS256"},
        key.jwk(kid="enc", use="enc"),
        key.jwk(kid="rs512", alg="RS512"),
    ]
    authenticator = auth.JwtAuthenticator(
        issuer=ISSUER, audience=AUDIENCE, tenant=TENANT, jwks_uri=JWKS_URI, http=http
    )
    unsigned = hand_made({"alg": "HS256", "kid": "hmac"}, claims()).rsplit(".", 1)[0]
    mac = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
    await refused(authenticator, f"{unsigned}.{b64url(mac)}", status=401, code=auth.BAD_ALGORITHM)
    for kid in ("hmac", "enc", "rs512"):
        await refused(authenticator, key.sign(claims(), kid=kid), status=401, code=auth.UNKNOWN_KEY)


# --- the Authorization header --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, auth.MISSING_TOKEN),
        ("", auth.MISSING_TOKEN),
        ("   ", auth.MISSING_TOKEN),
        ("Bearer", auth.MISSING_TOKEN),
        ("Bearer   ", auth.MISSING_TOKEN),
        ("Basic YWxpY2U6c2VjcmV0", auth.INVALID_TOKEN),
        ("Token abc.def.ghi", auth.INVALID_TOKEN),
        ("Bearer not-a-jwt", auth.INVALID_TOKEN),
        ("Bearer a.b", auth.INVALID_TOKEN),
        ("Bearer a.b.c.d.e", auth.INVALID_TOKEN),
        ("Bearer abc.def ghi.jkl", auth.INVALID_TOKEN),
        ("Bearer !!!.@@@.###", auth.INVALID_TOKEN),
        (f"Bearer {b64url(b'[1, 2]')}.{b64url(b'{}')}.c2ln", auth.INVALID_TOKEN),
    ],
)
async def test_a_missing_or_malformed_header_is_401(
    authenticator: auth.JwtAuthenticator, issuer: Issuer, header: str | None, code: str
) -> None:
    with pytest.raises(ports.AuthError) as caught:
        await authenticator.authenticate(header)
    assert (caught.value.status, caught.value.code) == (401, code)
    assert "Bearer" in caught.value.message or "JWT" in caught.value.message
    assert issuer.jwks_requests == 0  # nothing worth a key lookup


async def test_a_payload_that_is_not_an_object_is_invalid(
    authenticator: auth.JwtAuthenticator, key: Signer
) -> None:
    signed: str = jws.sign(b"[1, 2, 3]", key.private_pem.decode(), {"kid": key.kid}, "RS256")
    await refused(authenticator, signed, status=401, code=auth.INVALID_TOKEN)


# --- scopes and the challenge ---------------------------------------------------------------


def test_require_scope_refuses_with_403_insufficient_scope() -> None:
    principal = ports.Principal(subject="s", tenant=TENANT, scopes=frozenset({"agents:invoke"}))
    auth.require_scope(principal, "agents:invoke")
    with pytest.raises(ports.AuthError) as caught:
        auth.require_scope(principal, "conversations:delete")
    assert (caught.value.status, caught.value.code) == (403, auth.INSUFFICIENT_SCOPE)
    assert "conversations:delete" in caught.value.message


def test_the_challenge_follows_rfc_6750() -> None:
    assert auth.challenge(ports.AuthError(401, auth.MISSING_TOKEN, "no token")) == "Bearer"
    value = auth.challenge(ports.AuthError(401, auth.TOKEN_EXPIRED, 'it "expired"'))
    assert value == 'Bearer error="invalid_token", error_description="it \\"expired\\""'
    value = auth.challenge(ports.AuthError(403, auth.INSUFFICIENT_SCOPE, "needs x"))
    assert value.startswith('Bearer error="insufficient_scope"')
    assert auth.challenge(ports.AuthError(403, auth.WRONG_TENANT, "other tenant")) == "Bearer"


def test_the_constructor_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="tenant"):
        auth.JwtAuthenticator(issuer=ISSUER, audience=AUDIENCE, tenant="")
    with pytest.raises(ValueError, match="leeway"):
        auth.JwtAuthenticator(issuer=ISSUER, audience=AUDIENCE, tenant=TENANT, leeway=-1)
    with pytest.raises(ValueError, match="max_stale_age"):
        auth.JwtAuthenticator(
            issuer=ISSUER, audience=AUDIENCE, tenant=TENANT, max_key_age=600, max_stale_age=60
        )
