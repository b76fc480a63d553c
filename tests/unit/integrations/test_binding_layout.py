"""The binding layout: every type's module writes exactly the keys the runtime reads."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import binding, checks

pytestmark = pytest.mark.unit

# One full spec per type, with every credential its binding can carry.
SPECS: dict[str, tuple[dict[str, Any], dict[str, bytes]]] = {
    "postgres": (
        {"postgres": {"host": "db.internal", "database": "agents", "sslMode": "verify-full"}},
        {"username": b"bmad", "password": b"pw-1234", "ca.crt": b"PEM"},
    ),
    "redis": (
        {"redis": {"host": "cache.internal", "tls": True, "username": "agent"}},
        {"password": b"pw-1234", "ca.crt": b"PEM"},
    ),
    "objectStorage": (
        {"objectStorage": {"provider": "gcs", "bucket": "bmad-artifacts"}},
        {"accessKeyId": b"GOOG1234", "secretAccessKey": b"sk-1234", "ca.crt": b"PEM"},
    ),
    "stripe": ({"stripe": {}}, {"apiKey": b"sk_test_1234", "webhookSecret": b"whsec_1234"}),
    "auth0": (
        {
            "auth0": {
                "domain": "acme.eu.auth0.com",
                "audience": "https://api.acme.test",
                "clientId": "client-1",
            }
        },
        {"clientSecret": b"cs-1234"},
    ),
    "email": (
        {
            "email": {
                "provider": "smtp",
                "host": "smtp.internal",
                "port": 587,
                "startTLS": True,
                "from": "noreply@acme.test",
            }
        },
        {"username": b"mailer", "password": b"pw-1234"},
    ),
    "llm": (
        {"llm": {"provider": "openai", "defaultModel": "gpt-4o-mini"}},
        {"apiKey": b"sk-1234"},
    ),
}


def full_spec(type_: str) -> tuple[integration.IntegrationSpec, dict[str, bytes]]:
    block, secret = SPECS[type_]
    body = {"type": type_, "secretRef": {"name": f"{type_.lower()}-creds"}, **block}
    return integration.IntegrationSpec.model_validate(body), secret


def test_every_type_has_a_layout() -> None:
    assert set(binding.LAYOUTS) == set(integration.TYPES)
    for layout in binding.LAYOUTS.values():
        assert {"type", "provider"} <= layout.required
        assert not layout.required & layout.optional


@pytest.mark.parametrize("type_", integration.TYPES)
def test_each_modules_binding_fits_its_layout(type_: str) -> None:
    spec, secret = full_spec(type_)
    data = checks.binding_data(spec, secret)
    assert binding.problems(data) == []
    assert data["type"] == type_
    assert data["provider"]
    assert all(isinstance(v, str) for v in data.values())


@pytest.mark.parametrize("type_", integration.TYPES)
def test_binding_keys_are_valid_secret_keys(type_: str) -> None:
    spec, secret = full_spec(type_)
    for key in checks.binding_data(spec, secret):
        assert key
        assert all(c.isalnum() or c in "-._" for c in key), key
        assert not key.startswith(".."), key  # kubelet's own names in the mounted dir


def test_problems_names_missing_and_unexpected_keys() -> None:
    found = binding.problems({"type": "stripe", "provider": "stripe", "apiKey": "k", "x": "1"})
    assert found == ["key 'apiBase' is missing", "key 'x' is not part of the layout"]


def test_problems_refuses_an_unknown_type() -> None:
    assert binding.problems({"type": "mongo"}) == [
        "key 'type' is 'mongo', not one of postgres, redis, objectStorage, stripe, auth0, "
        "email, llm"
    ]
    assert len(binding.problems({})) == 1


def test_flag_spells_booleans_the_binding_way() -> None:
    assert binding.flag(True) == "true"
    assert binding.flag(False) == "false"
