"""What every integration module shares: reasons, results, credentials, errors.

A check talks to the real service with the real client (connect plus one cheap
authenticated call) and ends either in a `Checked` result or in a `CheckError`
whose reason is one of the constants below and whose message says what to fix.
Credential values never appear in a message: `Credentials.redact` scrubs them from
any text (driver errors sometimes echo what they were given).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Reason(enum.StrEnum):
    CHECKED = "Checked"
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105 - a reason, not a secret
    SECRET_KEY_MISSING = "SecretKeyMissing"  # noqa: S105 - a reason, not a secret
    AUTHENTICATION_FAILED = "AuthenticationFailed"
    UNREACHABLE = "Unreachable"
    TLS_ERROR = "TLSError"
    TIMEOUT = "Timeout"
    INVALID_CONFIGURATION = "InvalidConfiguration"


class CheckError(Exception):
    """A check failed for a reason the user can act on."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Checked:
    """A successful check: what the service told us about itself."""

    server_version: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class CheckResult:
    """The outcome the operator writes into the Integration's status."""

    ok: bool
    reason: Reason
    message: str
    latency_ms: int
    server_version: str | None = None


# Default key names in the credentials Secret; spec.secretRef.keys overrides them.
DEFAULT_KEYS: Mapping[str, str] = {
    "username": "username",
    "password": "password",
    "api_key": "apiKey",
    "access_key_id": "accessKeyId",
    "secret_access_key": "secretAccessKey",
    "client_secret": "clientSecret",
    "webhook_secret": "webhookSecret",
    "ca_cert": "ca.crt",
}


@dataclass(frozen=True)
class Credentials:
    """The decoded data of the credentials Secret, with the key-name overrides applied."""

    secret_name: str | None
    data: Mapping[str, str] = field(default_factory=dict)
    key_names: Mapping[str, str] = field(default_factory=dict)

    def key(self, logical: str) -> str:
        return self.key_names.get(logical) or DEFAULT_KEYS[logical]

    def get(self, logical: str) -> str | None:
        return self.data.get(self.key(logical))

    def require(self, logical: str) -> str:
        value = self.get(logical)
        if value is None or value == "":
            where = f"Secret {self.secret_name}" if self.secret_name else "the credentials Secret"
            if not self.secret_name:
                raise CheckError(
                    Reason.INVALID_CONFIGURATION,
                    f"spec.secretRef is required: create a Secret with key {self.key(logical)!r}"
                    " and reference it in spec.secretRef.name",
                )
            raise CheckError(
                Reason.SECRET_KEY_MISSING,
                f"{where} has no key {self.key(logical)!r}: add it, or point "
                f"spec.secretRef.keys.{_camel(logical)} at the key that holds the {logical}",
            )
        return value

    def redact(self, text: str) -> str:
        for value in self.data.values():
            if value and len(value) >= 4:
                text = text.replace(value, "***")
        return text


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# Longest piece of a driver's own words quoted in a message.
SAID_MAX = 200


def said(what: BaseException | str, creds: Credentials, *, limit: int = SAID_MAX) -> str:
    """A driver error (or its text) in one line, credentials scrubbed, fit for a message."""
    text = " ".join(creds.redact(str(what)).split())
    if not text:
        text = type(what).__name__ if isinstance(what, BaseException) else "no detail"
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
