"""The Integration's decisions: a check's result in; its Ready condition, the event on a
flip, and when to check again out.

A check costs a round trip to a third-party service, so the decision whether one is
due is made here too: not when our own status write comes back as a watch event,
only when the spec or the credentials Secret changed, or the timer ran out.
Reasons are `bmad_integrations.base.Reason` (docs/integrations.md, "Ready reasons").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import base as ibase
from bmad_operator import events
from bmad_operator.conditions import FALSE, TRUE, Cond

# Reasons ---------------------------------------------------------------------------
CHECKED = ibase.Reason.CHECKED
INVALID_CONFIGURATION = ibase.Reason.INVALID_CONFIGURATION
NAME_CONFLICT = "NameConflict"
# The Encrypted condition of postgres and redis: how the check's connection travelled.
ENCRYPTED = "Encrypted"
TLS_VERIFIED = "TlsVerified"
TLS_NOT_VERIFIED = "TlsNotVerified"
PLAINTEXT_CONNECTION = "PlaintextConnection"
# Event reasons: the first success, a success after a failure.
EVENT_CHECKED = "Checked"
EVENT_RECOVERED = "Recovered"

MIN_RETRY_SECONDS = 5.0
MIN_DELAY_SECONDS = 0.5


class CheckMemory(NamedTuple):
    """What the last check saw, and when the next one is due (monotonic seconds)."""

    generation: int | None
    secret_version: str | None
    due: float
    failures: int


def check_due(
    memory: CheckMemory | None,
    *,
    generation: int | None,
    secret_version: str | None,
    now: float,
) -> bool:
    """Whether to check now: never checked, spec or Secret changed, or the timer ran out."""
    return not (
        memory is not None
        and memory.generation == generation
        and memory.secret_version == secret_version
        and now < memory.due
    )


def failures_after(memory: CheckMemory | None, *, ok: bool) -> int:
    """Consecutive failed checks, this one included."""
    if ok:
        return 0
    return memory.failures + 1 if memory else 1


def next_delay(interval: float, failures: int, *, jitter: float) -> float:
    """When to check again: the interval while healthy, a growing backoff while failing.

    `jitter` (0.9 to 1.1, chosen by the caller) spreads many Integrations' checks.
    """
    if failures <= 0:
        return interval * jitter
    backoff = min(interval, MIN_RETRY_SECONDS * 2.0 ** (failures - 1))
    return backoff * jitter


def requeue_delay(delay: float) -> float:
    """The queue delay for a check due in `delay` seconds (never a busy loop)."""
    return max(delay, MIN_DELAY_SECONDS)


def invalid_spec(message: str) -> Cond:
    return Cond("Ready", FALSE, INVALID_CONFIGURATION, message)


def ready_condition(result: ibase.CheckResult, spec: integration_api.IntegrationSpec) -> Cond:
    if result.ok:
        message = result.message or f"The {spec.type} service answered an authenticated request."
        return Cond("Ready", TRUE, CHECKED, message)
    return Cond("Ready", FALSE, str(result.reason), result.message)


def encrypted_condition(
    result: ibase.CheckResult, spec: integration_api.IntegrationSpec
) -> Cond | None:
    """Whether the datastore's connection is encrypted, from a successful check of a
    postgres or redis Integration (None otherwise: the last one seen stays)."""
    if not result.ok or result.transport is None:
        return None
    if result.transport == ibase.Transport.TLS_VERIFIED:
        return Cond(
            ENCRYPTED,
            TRUE,
            TLS_VERIFIED,
            "The connection is encrypted and the server's certificate was verified.",
        )
    if result.transport == ibase.Transport.TLS_UNVERIFIED:
        hint = (
            "put the server's CA in the credentials Secret (key ca.crt) to have it verified"
            if spec.type == "postgres"
            else "the certificate was not checked"
        )
        return Cond(
            ENCRYPTED,
            TRUE,
            TLS_NOT_VERIFIED,
            f"The connection is encrypted but the server's certificate was not verified: {hint}.",
        )
    fix = (
        "the server offers no TLS, or spec.postgres.sslMode is disable or allow: enable TLS on "
        "the server and set sslMode to verify-full (or require) to refuse plaintext"
        if spec.type == "postgres"
        else "spec.redis.tls is false: enable TLS on the server and set it to true"
    )
    return Cond(
        ENCRYPTED,
        FALSE,
        PLAINTEXT_CONNECTION,
        f"The connection is not encrypted: {fix}.",
    )


def name_conflict(obj: str, namespace: str) -> Cond:
    """The binding Secret's name (`obj`: `Secret/<name>`) is taken by a Secret the
    operator did not create: it is never overwritten or adopted."""
    return Cond(
        "Ready",
        FALSE,
        NAME_CONFLICT,
        f"{obj} in namespace {namespace} exists and was not created for this Integration; "
        "the binding was not published and that Secret was left untouched: delete or "
        "rename it, or give the Integration another name.",
    )


def ready_event(before: Mapping[str, Any] | None, ready: Cond) -> events.Event | None:
    """An event only when Ready flips (`before`: the previous Ready, if any)."""
    if before is not None and before.get("status") == ready.status:
        return None
    if ready.status == TRUE:
        reason = EVENT_CHECKED if before is None else EVENT_RECOVERED
        return events.Event(events.NORMAL, reason, ready.message)
    return events.Event(events.WARNING, str(ready.reason), ready.message)
