"""The binding Secret's layout: the contract between the operator and the runtime.

The operator publishes, per Integration, a Secret in the servicebinding.io layout
(one key per value, ``type`` and ``provider`` always present); kubelet mounts it as
``$SERVICE_BINDING_ROOT/<integration>/<key>`` files in every Agent that binds the
Integration. Each type's module writes its keys (``binding()``), and
``bmad_runtime.bindings`` reads them: this module names them once for both, so
that a key renamed on one side is a failing test, not a broken pod.

Single-word keys are servicebinding.io's well-known ones (``host``, ``port``,
``uri``, ``username``, ``password``, ``database``…); multi-word keys are camelCase
like the Integration API (``accessKeyId``, ``apiKey``, ``jwksUri``…).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from bmad_crds.v1alpha1 import integration

TYPE = "type"
PROVIDER = "provider"
HOST = "host"
PORT = "port"
URI = "uri"
USERNAME = "username"
PASSWORD = "password"  # noqa: S105 - a key name
DATABASE = "database"
CA_CERT = "ca.crt"
SSL_MODE = "sslMode"
TLS = "tls"
ENDPOINT = "endpoint"
REGION = "region"
BUCKET = "bucket"
PATH_STYLE = "pathStyle"
ACCESS_KEY_ID = "accessKeyId"
SECRET_ACCESS_KEY = "secretAccessKey"  # noqa: S105 - a key name
API_BASE = "apiBase"
API_KEY = "apiKey"
WEBHOOK_SECRET = "webhookSecret"  # noqa: S105 - a key name
ISSUER = "issuer"
DOMAIN = "domain"
AUDIENCE = "audience"
JWKS_URI = "jwksUri"
TOKEN_ENDPOINT = "tokenEndpoint"  # noqa: S105 - a key name
CLIENT_ID = "clientId"
CLIENT_SECRET = "clientSecret"  # noqa: S105 - a key name
FROM = "from"
START_TLS = "startTLS"
BASE_URL = "baseUrl"
DEFAULT_MODEL = "defaultModel"

TRUE = "true"
FALSE = "false"


class Layout(NamedTuple):
    """The keys of one type's binding: always written, and written when known."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @property
    def keys(self) -> frozenset[str]:
        return self.required | self.optional


def _layout(*required: str, optional: tuple[str, ...] = ()) -> Layout:
    return Layout(frozenset((TYPE, PROVIDER, *required)), frozenset(optional))


LAYOUTS: Mapping[integration.IntegrationType, Layout] = {
    "postgres": _layout(
        HOST, PORT, DATABASE, USERNAME, PASSWORD, SSL_MODE, URI, optional=(CA_CERT,)
    ),
    "redis": _layout(HOST, PORT, DATABASE, TLS, URI, optional=(USERNAME, PASSWORD, CA_CERT)),
    "objectStorage": _layout(
        ENDPOINT,
        REGION,
        BUCKET,
        PATH_STYLE,
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        optional=(CA_CERT,),
    ),
    "stripe": _layout(API_BASE, API_KEY, optional=(WEBHOOK_SECRET,)),
    "auth0": _layout(
        ISSUER, DOMAIN, AUDIENCE, JWKS_URI, TOKEN_ENDPOINT, optional=(CLIENT_ID, CLIENT_SECRET)
    ),
    "email": _layout(
        FROM,
        optional=(HOST, PORT, START_TLS, USERNAME, PASSWORD, API_BASE, API_KEY, DOMAIN),
    ),
    "llm": _layout(BASE_URL, optional=(API_KEY, DEFAULT_MODEL)),
}


def problems(data: Mapping[str, str]) -> list[str]:
    """What is wrong with a binding's data against its type's layout (empty: nothing)."""
    type_ = data.get(TYPE)
    layout = next((found for name, found in LAYOUTS.items() if name == type_), None)
    if layout is None:
        return [f"key {TYPE!r} is {type_!r}, not one of {', '.join(LAYOUTS)}"]
    found: list[str] = [f"key {key!r} is missing" for key in sorted(layout.required - set(data))]
    found += [f"key {key!r} is not part of the layout" for key in sorted(set(data) - layout.keys)]
    return found


def flag(value: bool) -> str:
    return TRUE if value else FALSE
