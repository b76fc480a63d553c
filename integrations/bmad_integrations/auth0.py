"""Auth0 (or any OIDC issuer): the source of the keys that agent tokens are verified with.

The agent runtime verifies Bearer JWTs against the issuer's JWKS, so the check makes
sure of exactly what that needs: the issuer's OpenID discovery document answers and
names the same issuer, and its JWKS holds at least one RSA signing key. When the
Integration also carries machine-to-machine credentials (spec.auth0.clientId and a
client secret in the Secret), a client-credentials token request proves them.

The discovery document is the issuer's word, and the issuer is whatever host the
tenant wrote: the endpoints it names are followed only on the issuer's own origin
(or where the operator's administrator allowed it), and nothing it says is quoted.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, httpcheck, lazy

if TYPE_CHECKING:
    import httpx
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")

SERVICE = "the OIDC issuer"
DISCOVERY_PATH = ".well-known/openid-configuration"
# Where Auth0 serves these; the check itself reads them from the discovery document.
AUTH0_JWKS_PATH = ".well-known/jwks.json"
AUTH0_TOKEN_PATH = "oauth/token"  # noqa: S105 - a URL path
# OAuth error codes (RFC 6749 §5.2, and Auth0's access_denied) that mean "these
# credentials may not have a token", as opposed to a malformed request.
_AUTH_ERRORS = frozenset({"access_denied", "invalid_client", "unauthorized_client"})
_OAUTH_ERRORS = _AUTH_ERRORS | {
    "invalid_request",
    "invalid_grant",
    "unsupported_grant_type",
    "invalid_scope",
}


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
    policy: egress.Policy,
    transport: httpx.AsyncBaseTransport | None = None,
) -> base.Checked:
    issuer = issuer_url(block)
    httpcheck.check_base_url(issuer, field=_field(block))
    client_secret = creds.get("client_secret")
    if block.client_id and creds.secret_name:
        # A client with a credentials Secret means a client secret is meant to be there.
        client_secret = creds.require("client_secret")
    async with httpcheck.client(
        timeout=timeout, creds=creds, policy=policy, field=_field(block), transport=transport
    ) as http:
        discovery = await _discover(http, block, issuer, creds=creds)
        jwks_uri = _endpoint(discovery, "jwks_uri", block=block, issuer=issuer, policy=policy)
        if jwks_uri is None:
            raise base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"the OpenID configuration of {issuer} names no jwks_uri: point "
                f"{_field(block)} at an issuer that publishes its signing keys",
            )
        signing_keys = await _signing_keys(http, jwks_uri, creds=creds)
        detail = f"issuer {issuer}: {signing_keys} RSA signing key(s)"
        if client_secret and block.client_id:
            token_endpoint = _endpoint(
                discovery, "token_endpoint", block=block, issuer=issuer, policy=policy
            )
            if token_endpoint is None:
                raise base.CheckError(
                    base.Reason.INVALID_CONFIGURATION,
                    f"the OpenID configuration of {issuer} names no token_endpoint, so "
                    "spec.auth0.clientId cannot get tokens: remove clientId or use an issuer "
                    "that issues client-credentials tokens",
                )
            await _client_credentials(
                http,
                block,
                token_endpoint,
                client_id=block.client_id,
                client_secret=client_secret,
                creds=creds,
            )
            detail += f"; client {block.client_id} obtained a token"
    return base.Checked(detail=detail)


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parsed = httpx.URL(url)
        return parsed.scheme, parsed.host.lower(), egress.url_port(parsed)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, TypeError, ValueError):
        return None


def _endpoint(
    discovery: dict[str, Any],
    key: str,
    *,
    block: integration.Auth0,
    issuer: str,
    policy: egress.Policy,
) -> str | None:
    """The endpoint the discovery document names under `key`, if the check may follow it.

    The document is the issuer's (that is, the tenant's) word: an endpoint on another
    origin would make the operator send requests, and for the token endpoint the client
    secret, wherever it says. Only the issuer's own scheme, host and port are followed,
    or a host the operator's administrator named in the allow list.
    """
    url = discovery.get(key)
    if not isinstance(url, str) or not url:
        return None
    origin = _origin(url)
    if origin is None or not origin[1]:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the OpenID configuration of {issuer} names a {key} that is not an http(s) "
            f"URL: check {_field(block)}",
        )
    if origin == _origin(issuer) or policy.names(origin[1], origin[2]):
        return url
    raise base.CheckError(
        base.Reason.DESTINATION_NOT_ALLOWED,
        f"the OpenID configuration of {issuer} names a {key} on another origin than the "
        "issuer's, and checks follow only the issuer's own scheme, host and port: check "
        f"{_field(block)}, or, if the issuer really serves it there, ask the operator's "
        f"administrator to name that host in {egress.ALLOW_SETTING}",
    )


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
        raise httpcheck.unexpected(response, service=SERVICE, fix=fix)
    document = httpcheck.read_json(response)
    if not isinstance(document, dict):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{httpcheck.display_url(url)} did not answer with an OpenID configuration "
            f"(JSON object): {fix}",
        )
    announced = document.get("issuer")
    if announced == issuer:
        return document
    where = httpcheck.display_url(url)
    if not isinstance(announced, str) or not announced:
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the OpenID configuration at {where} names no issuer: check {_field(block)}",
        )
    # The announced issuer is the server's word: say how it differs, never what it is.
    if announced.rstrip("/") == issuer.rstrip("/"):
        slash = "with" if announced.endswith("/") else "without"
        fix = f"set spec.auth0.issuer {slash} the trailing slash"
    else:
        fix = f"check {_field(block)}: it must be exactly the issuer the document names"
    raise base.CheckError(
        base.Reason.INVALID_CONFIGURATION,
        f"the OpenID configuration at {where} names another issuer than {issuer!r}, so "
        f"tokens would fail the issuer check: {fix}",
    )


async def _signing_keys(http: httpx.AsyncClient, jwks_uri: str, *, creds: base.Credentials) -> int:
    # The URL is the discovery document's word: messages name it, never quote it.
    service = where = "the issuer's JWKS (the discovery document's jwks_uri)"
    response = await httpcheck.send(
        http, "GET", jwks_uri, service=service, creds=creds, shown=False
    )
    if response.status_code != 200:
        raise httpcheck.unexpected(
            response,
            service=service,
            fix="the discovery document's jwks_uri must serve the issuer's public keys",
            shown=False,
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
            f"{where} has no RSA signing key (kty RSA, use sig) among "
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
    token_endpoint: str,
    *,
    client_id: str,
    client_secret: str,
    creds: base.Credentials,
) -> None:
    service = "the issuer's token endpoint (the discovery document's token_endpoint)"
    response = await httpcheck.send(
        http,
        "POST",
        token_endpoint,
        service=service,
        creds=creds,
        shown=False,
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
            "audience": block.audience,
        },
    )
    body = httpcheck.read_json(response)
    error = body.get("error") if isinstance(body, dict) else None
    # An OAuth error code is shown only when it is one of the codes the RFCs define.
    code = error if isinstance(error, str) and error in _OAUTH_ERRORS else None
    if response.status_code == 200:
        if isinstance(body, dict) and body.get("access_token"):
            return
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{service} answered 200 without an access_token: check that it is the "
            "issuer's OAuth token endpoint",
        )
    if response.status_code in (401, 403) or code in _AUTH_ERRORS:
        key = creds.key("client_secret")
        raise base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"the issuer refused a client-credentials token for client {client_id} and "
            f"audience {block.audience} ({code or response.status_code}): check "
            f"spec.auth0.clientId, key {key!r} of {httpcheck.secret(creds)}, and that the "
            "client is authorized for the audience",
        )
    fix = "check spec.auth0.clientId and spec.auth0.audience"
    if code is not None:
        fix = f"the issuer answered OAuth error {code}: {fix}"
    raise httpcheck.unexpected(response, service=service, fix=fix, shown=False)


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
