"""The signing keys of a JWK set: which keys a bearer token may be verified with.

Only RSA signature keys for the algorithms the runtime accepts are kept; symmetric and
EC keys, keys for encryption and keys that do not parse are skipped, whatever a token
names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

from jose import exceptions as jose_errors
from jose import jwk

log = logging.getLogger(__name__)

# RS256 only: the algorithm is never taken from the token alone.
ALGORITHMS: Final = frozenset({"RS256"})


def shown(value: object, limit: int = 40) -> str:
    """A value taken from a token, quoted, ASCII-only and cut short for a message or a log."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SigningKey:
    kid: str | None
    algorithm: str
    key: Any  # a jose.jwk.Key built for `algorithm`


class FetchError(Exception):
    """The JWK set (or the discovery document) could not be had; the message says why."""


def signing_keys(document: object, where: str) -> dict[str | None, SigningKey]:
    """The RSA signature keys of a JWK set, by key id (None for a key without one)."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise FetchError(f"{where} is not a JWK set (a JSON object with a keys list)")
    found: dict[str | None, SigningKey] = {}
    for entry in keys:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue  # symmetric or EC keys: never used, whatever a token says
        if entry.get("use", "sig") != "sig":
            continue
        algorithm = entry.get("alg", "RS256")
        kid = entry.get("kid")
        if algorithm not in ALGORITHMS or not (kid is None or isinstance(kid, str)):
            continue
        try:
            key = jwk.construct(entry, algorithm)
        except (jose_errors.JOSEError, ValueError, TypeError) as exc:
            log.warning("Skipping the unusable key %s of %s: %s", shown(kid), where, exc)
            continue
        found.setdefault(kid, SigningKey(kid=kid, algorithm=algorithm, key=key))
    return found
