"""What every integration module shares: reasons, results, credentials, errors.

A check talks to the real service with the real client (connect plus one cheap
authenticated call) and ends either in a `Checked` result or in a `CheckError`
whose reason is one of the constants below and whose message says what to fix.

Messages are written by us, never copied from a server or a driver: the destination
is chosen by a tenant, so whatever it answers (a banner, an error text, a header, a
certificate's names) must not come back through the Integration's status and events.
A message may hold what the spec says, status codes and error codes that we
recognise, and counts. Credential values never appear in one: `Credentials.redact`
scrubs them as a last line of defence.
"""

from __future__ import annotations

import enum
import re
import ssl
from collections.abc import Iterator, Mapping
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
    DESTINATION_NOT_ALLOWED = "DestinationNotAllowed"


class CheckError(Exception):
    """A check failed for a reason the user can act on."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Transport(enum.StrEnum):
    """How a connection to a datastore travels: what the status and /readyz show."""

    TLS_VERIFIED = "tls-verified"  # encrypted, the server's certificate checked
    TLS_UNVERIFIED = "tls-unverified"  # encrypted, the certificate not checked
    PLAINTEXT = "plaintext"  # not encrypted


def transport_of(*, encrypted: bool, verified: bool) -> Transport:
    if not encrypted:
        return Transport.PLAINTEXT
    return Transport.TLS_VERIFIED if verified else Transport.TLS_UNVERIFIED


@dataclass(frozen=True)
class Checked:
    """A successful check: what the service told us about itself."""

    server_version: str | None = None
    detail: str = ""
    # For the datastores (postgres, redis): how the check's connection travelled.
    transport: Transport | None = None


@dataclass(frozen=True)
class CheckResult:
    """The outcome the operator writes into the Integration's status."""

    ok: bool
    reason: Reason
    message: str
    latency_ms: int
    server_version: str | None = None
    transport: Transport | None = None


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


# A version as services report it: digits first, then letters, digits, dots, dashes.
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,39}")


def version(text: object) -> str | None:
    """The leading version number of what a service reported ("16.4 (Debian…)" -> "16.4").

    Only that much of a server's own words reaches the status: anything that does not
    start like a version is dropped.
    """
    found = _VERSION.match(str(text).strip()) if text is not None else None
    return found.group(0) if found else None


# OpenSSL's verification results (X509_V_ERR_*) that have a fix worth naming.
_TLS_VERIFY_PROBLEMS = {
    10: "the server's certificate has expired",
    18: "the server's certificate is self-signed",
    19: "the server's certificate chain ends in a CA the operator does not trust",
    20: "the server's certificate is signed by a CA the operator does not trust",
    21: "the server's certificate is signed by a CA the operator does not trust",
    62: "the server's certificate does not name the host",
    64: "the server's certificate does not name the address",
}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its cause (or context), then that one's, … without loops."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__


def caused_by(
    exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    """Whether an exception of `kind` sits anywhere in the cause chain."""
    return any(isinstance(link, kind) for link in chain(exc))


def tls_problem(exc: BaseException) -> str:
    """What went wrong in a TLS handshake, in our words (never the certificate's names)."""
    for link in chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError):
            return _TLS_VERIFY_PROBLEMS.get(
                getattr(link, "verify_code", None) or 0,
                "the server's certificate failed verification",
            )
    return "the TLS handshake failed"
