"""The llm check against emulators of OpenAI and Anthropic that this project wrote.

`emulators.openai_router` and `emulators.anthropic_router` answer in the shapes the
providers document, behind a real HTTP server on 127.0.0.1. They are not the
providers' APIs, which the tests may not reach.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, llm
from bmad_testbed import procs

from .emulators import LOOPBACK, HttpServer, anthropic_router, openai_router
from .policies import TESTBED

pytestmark = pytest.mark.integration

API_KEY = "sk-MARKER-live-6d2f9e1a"
OPENAI_MODELS = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
ANTHROPIC_MODELS = ["claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"]


def spec(provider: str, base_url: str, **fields: Any) -> integration.Llm:
    return integration.Llm.model_validate({"provider": provider, "baseUrl": base_url, **fields})


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="llm-creds", data=data)


async def failure(
    block: integration.Llm, secrets: base.Credentials, *, within: float = 5
) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await llm.check(block, secrets, timeout=within, policy=TESTBED)
    assert API_KEY not in caught.value.message
    assert "sk-" not in caught.value.message
    return caught.value


@pytest.fixture
def openai() -> Iterator[HttpServer]:
    with HttpServer(openai_router(api_key=API_KEY, models=OPENAI_MODELS)) as server:
        yield server


@pytest.fixture
def anthropic() -> Iterator[HttpServer]:
    router = anthropic_router(
        api_key=API_KEY,
        models=ANTHROPIC_MODELS,
        aliases={"claude-sonnet-4-0": "claude-sonnet-4-20250514"},
    )
    with HttpServer(router) as server:
        yield server


# --- OpenAI and OpenAI-compatible ---------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "openai-compatible"])
async def test_openai_with_the_right_key_checks_ready(openai: HttpServer, provider: str) -> None:
    checked = await llm.check(
        spec(provider, f"{openai.url}/v1", defaultModel="gpt-4o-mini"),
        creds(apiKey=API_KEY),
        timeout=5,
        policy=TESTBED,
    )
    assert checked.detail == "3 model(s) listed; default model gpt-4o-mini available"
    assert openai.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


async def test_openai_with_a_wrong_key_is_authentication_failed(openai: HttpServer) -> None:
    error = await failure(spec("openai", f"{openai.url}/v1"), creds(apiKey="sk-wrong-key-123456"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(401)" in error.message
    assert "Incorrect" not in error.message  # the emulator's OpenAI-style words


async def test_openai_without_a_key_is_secret_key_missing(openai: HttpServer) -> None:
    error = await failure(spec("openai", f"{openai.url}/v1"), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert openai.requests == []


async def test_openai_missing_default_model_is_invalid_configuration(openai: HttpServer) -> None:
    error = await failure(
        spec("openai", f"{openai.url}/v1", defaultModel="gpt-9"), creds(apiKey=API_KEY)
    )
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'gpt-9'" in error.message
    assert "it lists 3 other model(s)" in error.message


async def test_a_base_url_without_v1_is_invalid_configuration(openai: HttpServer) -> None:
    error = await failure(spec("openai-compatible", openai.url), creds(apiKey=API_KEY))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "spec.llm.baseUrl" in error.message


async def test_a_closed_port_is_unreachable() -> None:
    port = procs.free_port()
    error = await failure(
        spec("openai-compatible", f"http://127.0.0.1:{port}/v1"), creds(apiKey=API_KEY)
    )
    assert error.reason is base.Reason.UNREACHABLE
    assert f"127.0.0.1:{port}" in error.message


async def test_a_server_that_never_answers_is_a_timeout() -> None:
    # The kernel completes the handshake for a listening socket nobody accepts on.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        error = await failure(
            spec("openai-compatible", f"http://127.0.0.1:{port}/v1"),
            creds(apiKey=API_KEY),
            within=0.5,
        )
    assert error.reason is base.Reason.TIMEOUT
    assert "0.5s" in error.message


# --- Anthropic ----------------------------------------------------------------------


async def test_anthropic_with_the_right_key_checks_ready(anthropic: HttpServer) -> None:
    checked = await llm.check(
        spec("anthropic", anthropic.url, defaultModel="claude-sonnet-4-20250514"),
        creds(apiKey=API_KEY),
        timeout=5,
        policy=TESTBED,
    )
    assert "2 model(s) listed" in checked.detail
    request = anthropic.requests[0]
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["anthropic-version"] == "2023-06-01"


async def test_anthropic_resolves_a_model_alias(anthropic: HttpServer) -> None:
    await llm.check(
        spec("anthropic", anthropic.url, defaultModel="claude-sonnet-4-0"),
        creds(apiKey=API_KEY),
        timeout=5,
        policy=TESTBED,
    )
    assert [r.path for r in anthropic.requests] == ["/v1/models", "/v1/models/claude-sonnet-4-0"]


async def test_anthropic_with_a_wrong_key_is_authentication_failed(anthropic: HttpServer) -> None:
    error = await failure(spec("anthropic", anthropic.url), creds(apiKey="sk-ant-wrong-0000"))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(401)" in error.message


async def test_anthropic_unknown_model_is_invalid_configuration(anthropic: HttpServer) -> None:
    error = await failure(
        spec("anthropic", anthropic.url, defaultModel="claude-9"), creds(apiKey=API_KEY)
    )
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'claude-9'" in error.message


async def test_anthropic_without_a_key_is_secret_key_missing(anthropic: HttpServer) -> None:
    error = await failure(spec("anthropic", anthropic.url), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert anthropic.requests == []
