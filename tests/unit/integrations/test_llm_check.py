from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, llm
from bmad_integrations import binding as layout

from .policies import OPEN, PUBLIC

pytestmark = pytest.mark.unit

API_KEY = "sk-MARKER-proj-4b7e2a9d0c"  # must never show in a message

Handler = Callable[[httpx.Request], httpx.Response]


def block(provider: str, **fields: Any) -> integration.Llm:
    return integration.Llm.model_validate({"provider": provider, **fields})


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="llm-creds", data=data)


async def run(
    handler: Handler, spec: integration.Llm, secrets: base.Credentials | None = None
) -> base.Checked:
    return await llm.check(
        spec,
        secrets or creds(apiKey=API_KEY),
        timeout=5,
        policy=OPEN,
        transport=httpx.MockTransport(handler),
    )


async def fails(
    handler: Handler, spec: integration.Llm, secrets: base.Credentials | None = None
) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await run(handler, spec, secrets)
    message = caught.value.message
    assert API_KEY not in message
    assert "sk-" not in message  # not even the provider's masked echo of it
    return caught.value


def reply(status: int, body: Any) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    return handle


def openai_models(*ids: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": 1, "owned_by": "openai"} for i in ids],
    }


def anthropic_models(*ids: str, has_more: bool = False) -> dict[str, Any]:
    return {
        "data": [
            {"type": "model", "id": i, "display_name": i, "created_at": "2025-01-01T00:00:00Z"}
            for i in ids
        ],
        "has_more": has_more,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
    }


OPENAI_401 = {
    "error": {
        "message": "Incorrect API key provided: sk-MARK*****2a9d. You can find your API key "
        "at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
ANTHROPIC_401 = {
    "type": "error",
    "error": {"type": "authentication_error", "message": "invalid x-api-key"},
}


# --- OpenAI and OpenAI-compatible ---------------------------------------------------


async def test_openai_lists_models_with_a_bearer_key() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=openai_models("gpt-4o", "gpt-4o-mini"))

    checked = await run(handle, block("openai", defaultModel="gpt-4o-mini"))
    # Sent to the address the egress policy judged, under the name for Host and TLS.
    assert str(seen[0].url) == f"https://{PUBLIC}/v1/models"
    assert seen[0].headers["Host"] == "api.openai.com"
    assert seen[0].extensions["sni_hostname"] == "api.openai.com"
    assert seen[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert checked.detail == "2 model(s) listed; default model gpt-4o-mini available"


async def test_openai_compatible_joins_the_base_url() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=openai_models("llama3"))

    await run(handle, block("openai-compatible", baseUrl="http://vllm.example.test:8000/v1/"))
    assert str(seen[0].url) == f"http://{PUBLIC}:8000/v1/models"
    assert seen[0].headers["Host"] == "vllm.example.test:8000"


async def test_openai_compatible_may_run_without_a_key() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=openai_models("llama3"))

    spec = block("openai-compatible", baseUrl="http://ollama.example.test/v1")
    await run(handle, spec, creds())
    assert "Authorization" not in seen[0].headers


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_the_public_providers_need_a_key(provider: str) -> None:
    error = await fails(reply(200, openai_models()), block(provider), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert "'apiKey'" in error.message


async def test_openai_refusing_the_key_is_authentication_failed() -> None:
    error = await fails(reply(401, OPENAI_401), block("openai"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(401)" in error.message
    assert "'apiKey'" in error.message
    assert "Incorrect" not in error.message  # the provider's words are never quoted


async def test_a_missing_default_model_is_named() -> None:
    models = openai_models("gpt-4o", "gpt-4o-mini", "o1", "o3", "text-embedding-3-small", "tts-1")
    error = await fails(reply(200, models), block("openai", defaultModel="gpt-5-turbo"))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'gpt-5-turbo'" in error.message
    assert "spec.llm.defaultModel" in error.message
    assert "it lists 6 other model(s)" in error.message
    assert "o1" not in error.message  # what the server lists is not quoted


async def test_an_empty_model_list_is_named_too() -> None:
    error = await fails(reply(200, openai_models()), block("openai", defaultModel="gpt-4o"))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "lists no models" in error.message


@pytest.mark.parametrize(
    ("status", "body", "reason", "says"),
    [
        (
            429,
            {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
            base.Reason.UNREACHABLE,
            "429",
        ),
        (500, {"error": {"message": "The server had an error"}}, base.Reason.UNREACHABLE, "500"),
        (503, b"upstream down", base.Reason.UNREACHABLE, "503"),
        (404, b"404 page not found", base.Reason.INVALID_CONFIGURATION, "spec.llm.baseUrl"),
        (200, {"models": []}, base.Reason.INVALID_CONFIGURATION, "list of models"),
        (200, b"<html/>", base.Reason.INVALID_CONFIGURATION, "list of models"),
        (302, b"", base.Reason.INVALID_CONFIGURATION, "redirect"),
    ],
)
async def test_openai_other_answers_map_to_reasons(
    status: int, body: Any, reason: base.Reason, says: str
) -> None:
    error = await fails(reply(status, body), block("openai"))
    assert error.reason is reason
    assert says in error.message


async def test_what_the_server_says_is_never_quoted() -> None:
    body = {"error": {"message": f"upstream rejected {API_KEY}"}}
    error = await fails(reply(500, body), block("openai"))
    assert "upstream rejected" not in error.message
    assert "answered 500" in error.message


@pytest.mark.parametrize(
    "base_url",
    [
        "http://vllm.example.test/v1?x=",
        "http://vllm.example.test/v1#frag",
        "http://user:pw@vllm.example.test/v1",
        "http:///v1",
    ],
)
async def test_a_base_url_the_path_cannot_safely_extend_is_refused(base_url: str) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=openai_models())

    error = await fails(handle, block("openai-compatible", baseUrl=base_url), creds())
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.llm.baseUrl" in error.message
    assert seen == []


def _raising(exc: Exception) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return handle


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (httpx.ConnectError("[Errno -2] Name or service not known"), base.Reason.UNREACHABLE),
        (httpx.ConnectTimeout("timed out"), base.Reason.TIMEOUT),
        (httpx.ReadTimeout("timed out"), base.Reason.TIMEOUT),
        (httpx.ReadError("connection reset"), base.Reason.UNREACHABLE),
    ],
)
async def test_transport_failures_map_to_reasons(exc: Exception, reason: base.Reason) -> None:
    error = await fails(_raising(exc), block("anthropic"))
    assert error.reason is reason
    assert "https://api.anthropic.com/v1/models" in error.message
    assert "limit=" not in error.message


# --- Anthropic ----------------------------------------------------------------------


async def test_anthropic_lists_models_with_its_headers() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=anthropic_models("claude-sonnet-4-20250514"))

    checked = await run(handle, block("anthropic", defaultModel="claude-sonnet-4-20250514"))
    assert seen[0].url.path == "/v1/models"
    assert seen[0].headers["Host"] == "api.anthropic.com"
    assert seen[0].headers["x-api-key"] == API_KEY
    assert seen[0].headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen[0].headers
    assert "default model claude-sonnet-4-20250514 available" in checked.detail


async def test_anthropic_refusing_the_key_is_authentication_failed() -> None:
    error = await fails(reply(401, ANTHROPIC_401), block("anthropic"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(401)" in error.message
    assert "x-api-key" not in error.message


async def test_anthropic_forbidden_is_authentication_failed() -> None:
    body = {"type": "error", "error": {"type": "permission_error", "message": "no access"}}
    error = await fails(reply(403, body), block("anthropic"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(403)" in error.message


async def test_anthropic_resolves_an_alias_through_the_model_endpoint() -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=anthropic_models("claude-sonnet-4-20250514"))
        return httpx.Response(200, json=anthropic_models("claude-sonnet-4-20250514")["data"][0])

    await run(handle, block("anthropic", defaultModel="claude-sonnet-4-0"))
    assert seen == ["/v1/models", "/v1/models/claude-sonnet-4-0"]


async def test_anthropic_unknown_model_is_invalid_configuration() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=anthropic_models("claude-sonnet-4-20250514"))
        return httpx.Response(
            404,
            json={
                "type": "error",
                "error": {"type": "not_found_error", "message": "model: claude-9"},
            },
        )

    error = await fails(handle, block("anthropic", defaultModel="claude-9"))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'claude-9'" in error.message
    assert "it lists 1 other model(s)" in error.message


async def test_anthropic_overloaded_is_unreachable() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    error = await fails(reply(529, body), block("anthropic"))
    assert error.reason is base.Reason.UNREACHABLE
    assert "529" in error.message
    assert "Overloaded" not in error.message


async def test_anthropic_base_url_with_v1_is_explained() -> None:
    spec = block("anthropic", baseUrl="https://proxy.example.test/v1")
    error = await fails(reply(404, b"not found"), spec)
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "without /v1" in error.message


# --- binding ------------------------------------------------------------------------


def test_binding_of_openai() -> None:
    assert llm.binding(block("openai", defaultModel="gpt-4o"), creds(apiKey=API_KEY)) == {
        "type": "llm",
        "provider": "openai",
        "baseUrl": "https://api.openai.com/v1",
        "apiKey": API_KEY,
        "defaultModel": "gpt-4o",
    }


def test_binding_of_anthropic() -> None:
    assert llm.binding(block("anthropic"), creds(apiKey=API_KEY)) == {
        "type": "llm",
        "provider": "anthropic",
        "baseUrl": "https://api.anthropic.com",
        "apiKey": API_KEY,
    }


def test_binding_of_a_keyless_compatible_endpoint() -> None:
    spec = block("openai-compatible", baseUrl="http://vllm:8000/v1", defaultModel="llama3")
    assert llm.binding(spec, creds()) == {
        "type": "llm",
        "provider": "openai-compatible",
        "baseUrl": "http://vllm:8000/v1",
        "defaultModel": "llama3",
    }


@pytest.mark.parametrize(
    ("spec", "secrets"),
    [
        (block("openai", defaultModel="gpt-4o"), creds(apiKey=API_KEY)),
        (block("anthropic"), creds(apiKey=API_KEY)),
        (block("openai-compatible", baseUrl="http://vllm:8000/v1"), creds()),
    ],
)
def test_bindings_follow_the_shared_layout(
    spec: integration.Llm, secrets: base.Credentials
) -> None:
    assert layout.problems(llm.binding(spec, secrets)) == []
