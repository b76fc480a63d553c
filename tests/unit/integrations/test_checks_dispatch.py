"""The dispatcher: credentials from the Secret, bounds, and every failure as a result."""

from __future__ import annotations

import asyncio
import base64
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks

from .policies import OPEN

pytestmark = pytest.mark.unit

MARKER = "MARKER-dispatch-8c7b6a"  # a password that must never show in a message


def spec(type_: str = "postgres", **extra: Any) -> integration.IntegrationSpec:
    blocks: dict[str, Any] = {
        "postgres": {"host": "127.0.0.1", "database": "agents"},
        "redis": {"host": "127.0.0.1"},
        "objectStorage": {"provider": "s3", "bucket": "bmad-artifacts"},
        "stripe": {"apiBase": "http://127.0.0.1:1"},
    }
    body: dict[str, Any] = {"type": type_, type_: blocks[type_], "secretRef": {"name": "creds"}}
    body.update(extra)
    return integration.IntegrationSpec.model_validate(body)


CheckFn = Callable[..., Awaitable[base.Checked]]


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> Callable[[CheckFn], list[Any]]:
    """Replace every type's module with one whose check is the given coroutine."""

    def install(check: CheckFn) -> list[Any]:
        calls: list[Any] = []

        async def recording(block: Any, creds: base.Credentials, **options: Any) -> Any:
            assert options["policy"] is OPEN  # the operator's policy reaches every module
            calls.append((block, creds, options["timeout"]))
            return await check(block, creds, **options)

        def binding(block: Any, creds: base.Credentials) -> dict[str, str]:
            return {"host": "h", "type": "wrong"}

        module = types.SimpleNamespace(check=recording, binding=binding)
        monkeypatch.setattr(checks, "module_for", lambda type_: module)
        return calls

    return install


def test_secret_bytes_are_decoded_and_key_overrides_applied() -> None:
    creds = checks.credentials(
        spec(secretRef={"name": "pg", "keys": {"username": "user", "password": "pass"}}),
        {"user": b"bmad", "pass": MARKER.encode(), "other": "text"},
    )
    assert creds.secret_name == "pg"
    assert creds.require("username") == "bmad"
    assert creds.require("password") == MARKER
    assert creds.data["other"] == "text"
    assert creds.key("api_key") == "apiKey"  # not overridden: the default


def test_without_a_secret_ref_credentials_are_empty() -> None:
    body = {"type": "redis", "redis": {"host": "127.0.0.1"}}
    creds = checks.credentials(integration.IntegrationSpec.model_validate(body), None)
    assert creds.secret_name is None
    assert creds.get("password") is None


def test_from_api_data_decodes_base64() -> None:
    encoded = {"password": base64.b64encode(MARKER.encode()).decode()}
    assert checks.from_api_data(encoded) == {"password": MARKER.encode()}
    assert checks.decode_secret_data(checks.from_api_data(encoded)) == {"password": MARKER}


async def test_a_missing_secret_is_secret_not_found() -> None:
    result = await checks.check_integration(spec(), None, secret_found=False, policy=OPEN)
    assert not result.ok
    assert result.reason == base.Reason.SECRET_NOT_FOUND
    assert "'creds'" in result.message
    assert "create it" in result.message
    assert "'username', 'password'" in result.message


async def test_secret_not_found_names_the_overridden_keys() -> None:
    result = await checks.check_integration(
        spec("stripe", secretRef={"name": "billing", "keys": {"apiKey": "secret-key"}}),
        None,
        secret_found=False,
        policy=OPEN,
    )
    assert result.reason == base.Reason.SECRET_NOT_FOUND
    assert "'secret-key'" in result.message


async def test_a_missing_key_is_secret_key_missing_before_any_connection() -> None:
    result = await checks.check_integration(
        spec(), {"username": b"bmad"}, secret_found=True, policy=OPEN
    )
    assert result.reason == base.Reason.SECRET_KEY_MISSING
    assert "'password'" in result.message


async def test_success_carries_the_version_and_the_latency(
    fake_module: Callable[[CheckFn], list[Any]],
) -> None:
    async def ok(*args: Any, **options: Any) -> base.Checked:
        await asyncio.sleep(0.02)
        return base.Checked(server_version="15.4", detail="connected")

    calls = fake_module(ok)
    result = await checks.check_integration(
        spec(), {"password": MARKER.encode()}, secret_found=True, policy=OPEN, timeout=3
    )
    assert result.ok
    assert result.reason == base.Reason.CHECKED
    assert result.server_version == "15.4"
    assert result.latency_ms >= 20
    assert "15.4" in result.message
    block, creds, step = calls[0]
    assert isinstance(block, integration.Postgres)
    assert creds.get("password") == MARKER
    assert 0 < step <= 3


async def test_a_check_error_becomes_a_failed_result(
    fake_module: Callable[[CheckFn], list[Any]],
) -> None:
    async def refused(*args: Any, **options: Any) -> base.Checked:
        raise base.CheckError(base.Reason.AUTHENTICATION_FAILED, f"no\nway {MARKER}")

    fake_module(refused)
    result = await checks.check_integration(
        spec(), {"password": MARKER.encode()}, secret_found=True, policy=OPEN
    )
    assert not result.ok
    assert result.reason == base.Reason.AUTHENTICATION_FAILED
    assert MARKER not in result.message
    assert "\n" not in result.message


async def test_any_other_exception_is_unreachable_in_one_redacted_line(
    fake_module: Callable[[CheckFn], list[Any]],
) -> None:
    async def broken(*args: Any, **options: Any) -> base.Checked:
        raise KeyError(f"driver\nechoed {MARKER}\n  File 'x.py', line 1")

    fake_module(broken)
    result = await checks.check_integration(
        spec(), {"password": MARKER.encode()}, secret_found=True, policy=OPEN
    )
    assert result.reason == base.Reason.UNREACHABLE
    assert MARKER not in result.message
    assert "\n" not in result.message
    assert "KeyError" in result.message


async def test_the_overall_bound_is_a_timeout(
    fake_module: Callable[[CheckFn], list[Any]],
) -> None:
    async def hangs(*args: Any, **options: Any) -> base.Checked:
        await asyncio.sleep(30)
        return base.Checked()

    fake_module(hangs)
    result = await checks.check_integration(
        spec(), None, secret_found=True, policy=OPEN, timeout=0.1
    )
    assert result.reason == base.Reason.TIMEOUT
    assert "0.1s" in result.message
    assert 100 <= result.latency_ms < 5000


def test_binding_data_always_states_type_and_provider(
    fake_module: Callable[[CheckFn], list[Any]],
) -> None:
    async def unused(*args: Any, **options: Any) -> base.Checked:
        return base.Checked()

    fake_module(unused)
    data = checks.binding_data(spec("redis"), None)
    assert data == {"type": "redis", "provider": "redis", "host": "h"}
    data = checks.binding_data(spec("objectStorage"), None)
    assert data["provider"] == "s3"


def test_binding_data_dispatches_to_the_type_module() -> None:
    data = checks.binding_data(
        spec("stripe", secretRef={"name": "billing"}), {"apiKey": b"sk_test_abc"}
    )
    assert data == {
        "type": "stripe",
        "provider": "stripe",
        "apiBase": "http://127.0.0.1:1",
        "apiKey": "sk_test_abc",
    }


@pytest.mark.parametrize("type_", integration.TYPES)
def test_every_type_has_a_module(type_: str) -> None:
    module = checks.module_for(type_)  # type: ignore[arg-type]
    assert callable(module.check)
    assert callable(module.binding)
