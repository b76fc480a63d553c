"""The one entry point the operator calls: check an Integration, build its binding.

The operator hands over the parsed spec and the referenced Secret's data (its values
already base64-decoded, as bytes). This module turns that into `base.Credentials`,
picks the module for ``spec.type``, bounds the whole check in time and makes sure
that whatever happens comes back as a `base.CheckResult` whose message is one line,
says what to fix, and holds no credential value. It never raises for a failed check.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, cast

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress

# The module of each type. auth0, email and llm are written alongside this one and
# are imported only when needed, so that a check of one type never depends on the
# import of another's client library.
MODULES: Mapping[integration.IntegrationType, str] = {
    "postgres": "bmad_integrations.postgres",
    "redis": "bmad_integrations.redis_store",
    "objectStorage": "bmad_integrations.object_storage",
    "stripe": "bmad_integrations.stripe_billing",
    "auth0": "bmad_integrations.auth0",
    "email": "bmad_integrations.email",
    "llm": "bmad_integrations.llm",
}

# The credentials each type cannot be checked without, for the "create it" message.
REQUIRED_KEYS: Mapping[integration.IntegrationType, tuple[str, ...]] = {
    "postgres": ("username", "password"),
    "redis": ("password",),
    "objectStorage": ("access_key_id", "secret_access_key"),
    "stripe": ("api_key",),
    "auth0": (),
    "email": (),
    "llm": (),
}

DEFAULT_TIMEOUT = 10.0
# Each network step of a check gets this share of the whole bound, so that a step that
# hangs is reported by its module (which knows what a hang there means) before the
# overall bound cuts the check short.
STEP_SHARE = 0.8
# Values shorter than this are not scrubbed from messages (as in base.Credentials.redact).
_REDACT_MIN = 4
MESSAGE_MAX = 1024


class IntegrationModule(Protocol):
    """What every integration module exposes (checked structurally)."""

    def check(
        self, block: Any, creds: base.Credentials, *, timeout: float, policy: egress.Policy
    ) -> Awaitable[base.Checked]: ...

    def binding(self, block: Any, creds: base.Credentials) -> dict[str, str]: ...


def module_for(type_: integration.IntegrationType) -> IntegrationModule:
    return cast(IntegrationModule, importlib.import_module(MODULES[type_]))


def decode_secret_data(data: Mapping[str, bytes | str] | None) -> dict[str, str]:
    """The Secret's values as text: bytes are decoded as UTF-8, text is kept."""
    decoded: dict[str, str] = {}
    for key, value in (data or {}).items():
        decoded[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return decoded


def from_api_data(data: Mapping[str, str] | None) -> dict[str, bytes]:
    """A Secret's ``data`` as the API server returns it (base64 text) → raw bytes."""
    return {key: base64.b64decode(value) for key, value in (data or {}).items()}


def credentials(
    spec: integration.IntegrationSpec, secret_data: Mapping[str, bytes | str] | None
) -> base.Credentials:
    """`base.Credentials` for the spec: the Secret's name, its data, the key overrides."""
    ref = spec.secret_ref
    key_names: dict[str, str] = {}
    if ref is not None and ref.keys is not None:
        key_names = {
            logical: name
            for logical, name in ref.keys.model_dump(by_alias=False).items()
            if isinstance(name, str) and name
        }
    return base.Credentials(
        secret_name=ref.name if ref is not None else None,
        data=decode_secret_data(secret_data),
        key_names=key_names,
    )


def secret_not_found(spec: integration.IntegrationSpec) -> base.CheckResult:
    ref = spec.secret_ref
    name = ref.name if ref is not None else "(none)"
    creds = credentials(spec, None)
    wanted = REQUIRED_KEYS.get(spec.type, ())
    keys = ", ".join(repr(creds.key(logical)) for logical in wanted)
    with_keys = f" with the keys {keys}" if keys else " with the service's credentials"
    return base.CheckResult(
        ok=False,
        reason=base.Reason.SECRET_NOT_FOUND,
        message=(
            f"Secret {name!r} named in spec.secretRef.name does not exist: create it in the "
            f"Integration's namespace{with_keys}, or fix spec.secretRef.name"
        ),
        latency_ms=0,
    )


def _clean(message: str, creds: base.Credentials) -> str:
    """One line, bounded, and a last scrub of every credential value.

    The modules write their own messages and quote no server; this is the last line
    of defence should a credential still end up in one.
    User names are left alone here: they are often ordinary words ("postgres", "app")
    that the message uses for other things, and they are not secret.
    """
    username_key = creds.key("username")
    for key, value in creds.data.items():
        if key != username_key and value and len(value) >= _REDACT_MIN:
            message = message.replace(value, "***")
    text = " ".join(message.split())
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 1] + "…"


def _success_message(spec: integration.IntegrationSpec, checked: base.Checked) -> str:
    what = {
        "postgres": "PostgreSQL",
        "redis": "Redis",
        "objectStorage": "object storage",
        "stripe": "Stripe",
        "auth0": "the identity provider",
        "email": "the e-mail service",
        "llm": "the LLM endpoint",
    }[spec.type]
    version = f" {checked.server_version}" if checked.server_version else ""
    detail = f": {checked.detail}" if checked.detail else ""
    return f"{what}{version} answered the check{detail}"


async def check_integration(
    spec: integration.IntegrationSpec,
    secret_data: Mapping[str, bytes] | None,
    *,
    secret_found: bool,
    policy: egress.Policy,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - one bound shared by every step
) -> base.CheckResult:
    """Check the service the spec describes; never raises for a failed check.

    Every connection the check makes is judged by `policy` first (see `egress`).
    """
    if spec.secret_ref is not None and not secret_found:
        return secret_not_found(spec)
    creds = credentials(spec, secret_data)
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    def failed(reason: base.Reason, message: str) -> base.CheckResult:
        return base.CheckResult(
            ok=False, reason=reason, message=_clean(message, creds), latency_ms=elapsed()
        )

    try:
        async with asyncio.timeout(timeout):
            checker = module_for(spec.type)
            checked = await checker.check(
                spec.block(), creds, timeout=timeout * STEP_SHARE, policy=policy
            )
    except base.CheckError as exc:
        return failed(exc.reason, exc.message)
    except TimeoutError:
        return failed(
            base.Reason.TIMEOUT,
            f"the {spec.type} check did not finish within {timeout:g}s: check that the "
            "service is reachable from the operator and answers",
        )
    except Exception as exc:
        return failed(
            base.Reason.UNREACHABLE,
            f"the {spec.type} check failed ({type(exc).__name__}): check the settings in "
            "the spec and that the service runs",
        )
    return base.CheckResult(
        ok=True,
        reason=base.Reason.CHECKED,
        message=_clean(_success_message(spec, checked), creds),
        latency_ms=elapsed(),
        server_version=checked.server_version,
        transport=checked.transport,
    )


def binding_data(
    spec: integration.IntegrationSpec, secret_data: Mapping[str, bytes] | None
) -> dict[str, str]:
    """The binding Secret's data (servicebinding.io keys) for a checked Integration.

    Raises `base.CheckError` only when a credential the binding needs is missing,
    which a successful check has already ruled out.
    """
    creds = credentials(spec, secret_data)
    data = dict(module_for(spec.type).binding(spec.block(), creds))
    data["type"] = spec.type
    data.setdefault("provider", _default_provider(spec))
    return data


def _default_provider(spec: integration.IntegrationSpec) -> str:
    provider = getattr(spec.block(), "provider", None)
    return str(provider) if provider else spec.type
