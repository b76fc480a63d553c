"""`auth.JwtAuthenticator` against a real OIDC issuer on loopback, over real HTTP.

The issuer is a small threaded HTTP server serving the discovery document and a JWKS
that the test rotates; the authenticator makes its own httpx client, as it does in
an agent pod built from an ``auth0`` binding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bmad_runtime import auth, bindings, ports

from .oidc import AUDIENCE, TENANT, Issuer, Key

pytestmark = pytest.mark.integration


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    oidc = Issuer()
    oidc.thread.start()
    try:
        yield oidc
    finally:
        oidc.server.shutdown()
        oidc.server.server_close()


async def test_discovery_rotation_and_refusals_over_real_http(issuer: Issuer) -> None:
    first, second = Key("2026-01"), Key("2026-02")
    issuer.keys = [first.jwk()]
    # The refresh interval runs on a clock the test moves: no sleeping.
    now = [1000.0]
    authenticator = auth.JwtAuthenticator(
        issuer=issuer.url,
        audience=AUDIENCE,
        tenant=TENANT,
        jwks_uri=None,
        min_refresh_interval=0.5,
        monotonic=lambda: now[0],
    )
    try:
        principal = await authenticator.authenticate(f"Bearer {first.sign(issuer.claims())}")
        assert principal == ports.Principal(
            subject="auth0|alice", tenant=TENANT, scopes=frozenset({"agents:invoke"})
        )
        assert issuer.jwks_requests == 1

        # The issuer rotates: a token signed with the new key triggers one refresh.
        issuer.keys = [first.jwk(), second.jwk()]
        now[0] += 0.6  # past min_refresh_interval
        token = second.sign(issuer.claims(sub="auth0|bob"))
        assert (await authenticator.authenticate(f"Bearer {token}")).subject == "auth0|bob"
        assert issuer.jwks_requests == 2

        # A token for another tenant is refused with 403, one for another API with 401.
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(
                f"Bearer {second.sign(issuer.claims(**{auth.TENANT_CLAIM: 'globex'}))}"
            )
        assert (caught.value.status, caught.value.code) == (403, auth.WRONG_TENANT)
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(
                f"Bearer {second.sign(issuer.claims(aud='https://other.api'))}"
            )
        assert (caught.value.status, caught.value.code) == (401, auth.WRONG_AUDIENCE)
        assert issuer.jwks_requests == 2
    finally:
        await authenticator.aclose()


async def test_the_binding_jwks_uri_is_used_as_is(issuer: Issuer) -> None:
    key = Key("only")
    issuer.keys = [key.jwk()]
    settings = bindings.Auth0Settings(
        issuer=issuer.url, audience=AUDIENCE, jwks_uri=f"{issuer.url}keys"
    )
    authenticator = auth.JwtAuthenticator.from_settings(settings, tenant=TENANT)
    try:
        token = key.sign(issuer.claims())
        assert (await authenticator.authenticate(f"Bearer {token}")).tenant == TENANT
        assert issuer.jwks_requests == 1
    finally:
        await authenticator.aclose()


async def test_an_issuer_that_is_down_is_503_not_401() -> None:
    settings = bindings.Auth0Settings(
        issuer="http://127.0.0.1:9/", audience=AUDIENCE, jwks_uri="http://127.0.0.1:9/keys"
    )
    authenticator = auth.JwtAuthenticator.from_settings(settings, tenant=TENANT)
    try:
        token = Key("k").sign({"iss": "x", "exp": int(time.time()) + 60})
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(f"Bearer {token}")
        assert (caught.value.status, caught.value.code) == (503, auth.AUTH_UNAVAILABLE)
    finally:
        await authenticator.aclose()


async def test_cached_keys_are_trusted_no_longer_than_max_stale_age_while_the_jwks_is_down(
    issuer: Issuer,
) -> None:
    """Issue 10, hole 12 (JWKS keys kept for ever when the refresh fails). Before the
    fix, the keys of the last good fetch verified tokens however long the JWKS stayed
    down, and this test failed with:

        Failed: DID NOT RAISE AuthError
    """
    key = Key("2026-03")
    issuer.keys = [key.jwk()]
    now = [1000.0]  # the authenticator's monotonic clock, moved by the test
    authenticator = auth.JwtAuthenticator(
        issuer=issuer.url,
        audience=AUDIENCE,
        tenant=TENANT,
        jwks_uri=f"{issuer.url}keys",
        monotonic=lambda: now[0],
    )
    token = f"Bearer {key.sign(issuer.claims())}"
    try:
        assert (await authenticator.authenticate(token)).subject == "auth0|alice"
        issuer.jwks_status = 503  # the issuer's JWKS goes down

        # Past max_key_age: a refresh is tried and fails; the cached keys serve on.
        now[0] += auth.DEFAULT_MAX_KEY_AGE + 1
        assert (await authenticator.authenticate(token)).subject == "auth0|alice"
        assert issuer.jwks_requests == 2

        # Four hours (the default max_stale_age) after the last good fetch: the keys
        # are trusted no longer.
        now[0] = 1000.0 + 4 * 3600 + 1
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(token)
        assert (caught.value.status, caught.value.code) == (503, auth.AUTH_UNAVAILABLE)
        assert issuer.jwks_requests == 3

        # The JWKS is back: the next fetch (after the minimum interval) restores them.
        issuer.jwks_status = 200
        now[0] += auth.DEFAULT_MIN_REFRESH_INTERVAL + 1
        assert (await authenticator.authenticate(token)).subject == "auth0|alice"
        assert issuer.jwks_requests == 4
    finally:
        await authenticator.aclose()
