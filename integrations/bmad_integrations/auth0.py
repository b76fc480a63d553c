"""Auth0 (or any OIDC issuer): the source of the keys that agent tokens are verified with.

The agent runtime verifies Bearer JWTs against the issuer's JWKS, so the check makes
sure of exactly what that needs: the issuer's OpenID discovery document answers and
names the same issuer, and its JWKS holds at least one RSA signing key. When the
Integration also carries machine-to-machine credentials (spec.auth0.clientId and a
client secret in the Secret), a client-credentials token request proves them.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import httpx

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, httpcheck

SERVICE = "the OIDC issuer"
DISCOVERY_PATH = ".well-known/openid-configuration"
# Where Auth0 serves these; the check itself reads them from the discovery document.
AUTH0_JWKS_PATH = ".well-known/jwks.json"
AUTH0_TOKEN_PATH = "oauth/token"  # noqa: S105 - a URL path
# OAuth error codes (RFC 6749 §5.2, and Auth0's access_denied) that mean "these
# credentials may not have a token", as opposed to a malformed request.
_AUTH_ERRORS = frozenset({"access_denied", "invalid_client", "unauthorized_client"})


def issuer_url(block: integration.Auth0) -> str:
    """The issuer: spec.auth0.issuer as written, or Auth0's https://<domain>/."""
    if block.issuer:
        return block.issuer
    if block.domain:
        return f"https://{block.domain}/"
    raise base.CheckError(
        base.Reason.INVALID_CONFIGURATION,
        "spec.auth0 needs one of domain and issuer: set the Auth0 domain or the issuer URL",
    )


def _field(block: integration.Auth0) -> str:
    return "spec.auth0.issuer" if block.issuer else "spec.auth0.domain"


async def check(
    block: integration.Auth0,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each HTTP exchange, not the coroutine
    transport: httpx.AsyncBaseTransport | None = None,
) -> base.Checked:
    issuer = issuer_url(block)
    async with httpcheck.client(timeout=timeout, creds=creds, transport=transport) as http:
        discovery = await _discover(http, block, issuer, creds=creds)
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"the OpenID configuration of {issuer} names no jwks_uri: point "
                f"{_field(block)} at an issuer that publishes its signing keys",
            )
        signing_keys = await _signing_keys(http, jwks_uri, creds=creds)
        detail = f"issuer {issuer}: {signing_keys} RSA signing key(s)"
        client_secret = creds.get("client_secret")
        if block.client_id and creds.secret_name:
            # A client with a credentials Secret means a client secret is meant to be there.
            client_secret = creds.require("client_secret")
        if client_secret and block.client_id:
            await _client_credentials(
                http,
                block,
                discovery,
                client_id=block.client_id,
                client_secret=client_secret,
                creds=creds,
            )
            detail += f"; client {block.client_id} obtained a token"
    return base.Checked(detail=detail)


async def _discover(
    http: httpx.AsyncClient,
    block: integration.Auth0,
    issuer: str,
    *,
    creds: base.Credentials,
) -> dict[str, Any]:
    url = httpcheck.join(issuer, DISCOVERY_PATH)
    response = await httpcheck.send(http, "GET", url, service=SERVICE, creds=creds)
    fix = f"check {_field(block)}: the issuer must serve /{DISCOVERY_PATH}"
    if response.status_code != 200:
        raise httpcheck.unexpected(response, service=SERVICE, creds=creds, fix=fix)
    document = httpcheck.read_json(response)
    if not isinstance(document, dict):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{httpcheck.display_url(url)} did not answer with an OpenID configuration "
            f"(JSON object): {fix}",
        )
    announced = document.get("issuer")
    if announced != issuer:
        where = httpcheck.display_url(url)
        if not isinstance(announced, str) or not announced:
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"the OpenID configuration at {where} names no issuer: check {_field(block)}",
            )
        shown = httpcheck.quote(announced, creds=creds)
        fix = (
            f"set spec.auth0.issuer to exactly {shown!r}"
            if block.issuer
            else (f"check {_field(block)}, or set spec.auth0.issuer to {shown!r} instead")
        )
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the OpenID configuration at {where} names issuer {shown!r}, not {issuer!r}, so "
            f"tokens would fail the issuer check: {fix}",
        )
    return document


async def _signing_keys(http: httpx.AsyncClient, jwks_uri: str, *, creds: base.Credentials) -> int:
    response = await httpcheck.send(http, "GET", jwks_uri, service="the issuer's JWKS", creds=creds)
    where = httpcheck.display_url(jwks_uri)
    if response.status_code != 200:
        raise httpcheck.unexpected(
            response,
            service="the issuer's JWKS",
            creds=creds,
            fix="the discovery document's jwks_uri must serve the issuer's public keys",
        )
    document = httpcheck.read_json(response)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{where} is not a JWK set (a JSON object with a keys list): the issuer's "
            "jwks_uri must serve its public keys",
        )
    count = sum(1 for key in keys if _is_rsa_signing_key(key))
    if count == 0:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the JWK set at {where} has no RSA signing key (kty RSA, use sig) among "
            f"{len(keys)} key(s): agents verify RS256 tokens, so configure the issuer to "
            "sign with RS256",
        )
    return count


def _is_rsa_signing_key(key: object) -> bool:
    if not isinstance(key, dict):
        return False
    return (
        key.get("kty") == "RSA"
        and key.get("use", "sig") == "sig"
        and isinstance(key.get("n"), str)
        and isinstance(key.get("e"), str)
    )


async def _client_credentials(
    http: httpx.AsyncClient,
    block: integration.Auth0,
    discovery: dict[str, Any],
    *,
    client_id: str,
    client_secret: str,
    creds: base.Credentials,
) -> None:
    token_endpoint = discovery.get("token_endpoint")
    if not isinstance(token_endpoint, str) or not token_endpoint:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the OpenID configuration of {issuer_url(block)} names no token_endpoint, so "
            "spec.auth0.clientId cannot get tokens: remove clientId or use an issuer that "
            "issues client-credentials tokens",
        )
    service = "the issuer's token endpoint"
    response = await httpcheck.send(
        http,
        "POST",
        token_endpoint,
        service=service,
        creds=creds,
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
            "audience": block.audience,
        },
    )
    body = httpcheck.read_json(response)
    error = body.get("error") if isinstance(body, dict) else None
    description = body.get("error_description") if isinstance(body, dict) else None
    said = ": ".join(httpcheck.quote(part, creds=creds) for part in (error, description) if part)
    if response.status_code == 200:
        if isinstance(body, dict) and body.get("access_token"):
            return
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{httpcheck.display_url(token_endpoint)} answered 200 without an access_token: "
            "check that the discovery document's token_endpoint is the issuer's OAuth "
            "token endpoint",
        )
    if response.status_code in (401, 403) or (isinstance(error, str) and error in _AUTH_ERRORS):
        key = creds.key("client_secret")
        raise base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"the issuer refused a client-credentials token for client {client_id} and "
            f"audience {block.audience}"
            + (f" ({said})" if said else f" ({httpcheck.status_line(response)})")
            + f": check spec.auth0.clientId, key {key!r} of {httpcheck.secret(creds)}, "
            "and that the client is authorized for the audience",
        )
    raise httpcheck.unexpected(
        response,
        service=service,
        creds=creds,
        said=said or None,
        fix="check spec.auth0.clientId and spec.auth0.audience",
    )


def binding(block: integration.Auth0, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: where tokens come from and how to verify them.

    jwksUri and tokenEndpoint follow Auth0's layout under the issuer; the check reads
    the real ones from the discovery document and fails when the issuer has none.
    """
    issuer = issuer_url(block)
    prefix = issuer if issuer.endswith("/") else issuer + "/"
    domain = block.domain or urllib.parse.urlsplit(issuer).netloc
    data = {
        "type": "auth0",
        "provider": "auth0",
        "issuer": issuer,
        "domain": domain,
        "audience": block.audience,
        "jwksUri": prefix + AUTH0_JWKS_PATH,
        "tokenEndpoint": prefix + AUTH0_TOKEN_PATH,
    }
    if block.client_id:
        data["clientId"] = block.client_id
    client_secret = creds.get("client_secret")
    if client_secret:
        data["clientSecret"] = client_secret
    return data
