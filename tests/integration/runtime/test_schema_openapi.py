"""The app's OpenAPI document, checked against the app itself with schemathesis.

Schemathesis generates requests from the document (valid and invalid ones) and sends
them to the app in process (echo model, in-memory store, auth off). Every answer must
be documented (status, content type, headers) and match its schema, and none may be a
5xx. Schemathesis is a dev dependency (pyproject.toml): the test never skips.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks as st_checks
from schemathesis.specs.openapi import checks as openapi_checks

from bmad_runtime import app as app_mod
from bmad_runtime import settings as settings_mod
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import echo, router

pytestmark = pytest.mark.integration

CHECKS = [
    st_checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
]


def make_app() -> object:
    store = inprocess.InProcessStore()
    return app_mod.create_app(
        # Every value the app reads is given: nothing comes from BMAD_* of the environment.
        settings_mod.RuntimeSettings(
            agent_name="schema-1",
            agent_namespace="acme",
            tenant="acme",
            max_request_bytes=64 * 1024,
            memory_store="inProcess",
        ),
        store=store,
        providers=router.ModelRouter([echo.EchoProvider()]),
        authenticator=None,
        limiter=None,
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", make_app())


@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_answer_is_documented_and_never_a_server_error(case: object) -> None:
    case.call_and_validate(checks=CHECKS)  # type: ignore[attr-defined]


def test_the_document_covers_every_route() -> None:
    document = schema.raw_schema
    assert set(document["paths"]) == {
        "/v1/invoke",
        "/v1/conversations",
        "/v1/conversations/{conversation_id}/messages",
        "/v1/conversations/{conversation_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
