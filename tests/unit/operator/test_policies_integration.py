"""The Integration's decisions, pure: when to check, what Ready says, which event."""

from __future__ import annotations

import pytest

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import base as ibase
from bmad_operator.conditions import FALSE, TRUE, Cond
from bmad_operator.policies import integration as policy

pytestmark = pytest.mark.unit

SPEC = integration_api.IntegrationSpec.model_validate(
    {"type": "redis", "redis": {"host": "10.0.0.7"}}
)
CHECKED = {"type": "Ready", "status": "True", "reason": "Checked"}
FAILED = {"type": "Ready", "status": "False", "reason": "Unreachable"}


def test_a_check_is_due_when_new_changed_or_timed_out() -> None:
    memory = policy.CheckMemory(generation=2, secret_version="7", due=100.0, failures=0)
    assert policy.check_due(None, generation=2, secret_version="7", now=0.0)
    assert not policy.check_due(memory, generation=2, secret_version="7", now=99.0)
    assert policy.check_due(memory, generation=3, secret_version="7", now=99.0)
    assert policy.check_due(memory, generation=2, secret_version="8", now=99.0)
    assert policy.check_due(memory, generation=2, secret_version="7", now=100.0)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 300.0), (1, 5.0), (2, 10.0), (3, 20.0), (7, 300.0), (40, 300.0)],
)
def test_next_check_the_interval_while_healthy_a_capped_backoff_while_failing(
    failures: int, expected: float
) -> None:
    assert policy.next_delay(300.0, failures, jitter=1.0) == expected
    assert policy.next_delay(300.0, failures, jitter=1.1) == pytest.approx(expected * 1.1)


def test_failures_count_up_and_reset() -> None:
    memory = policy.CheckMemory(1, "1", 0.0, failures=2)
    assert policy.failures_after(None, ok=False) == 1
    assert policy.failures_after(memory, ok=False) == 3
    assert policy.failures_after(memory, ok=True) == 0


def test_the_queue_never_spins() -> None:
    assert policy.requeue_delay(-3.0) == 0.5
    assert policy.requeue_delay(42.0) == 42.0


def test_ready_from_a_check_result() -> None:
    ok = policy.ready_condition(ibase.CheckResult(True, ibase.Reason.CHECKED, "", 3), SPEC)
    assert ok == Cond(
        "Ready", TRUE, "Checked", "The redis service answered an authenticated request."
    )
    said = policy.ready_condition(ibase.CheckResult(True, ibase.Reason.CHECKED, "Redis 7", 3), SPEC)
    assert said.message == "Redis 7"
    bad = policy.ready_condition(
        ibase.CheckResult(False, ibase.Reason.TLS_ERROR, "certificate expired", 3), SPEC
    )
    assert bad == Cond("Ready", FALSE, "TLSError", "certificate expired")


def test_encrypted_from_how_the_check_connected() -> None:
    """Issue 10, hole 10: a datastore reached in plaintext is said in status."""
    pg = integration_api.IntegrationSpec.model_validate(
        {
            "type": "postgres",
            "secretRef": {"name": "pg"},
            "postgres": {"host": "db", "database": "app"},
        }
    )

    def result(transport: ibase.Transport | None, *, ok: bool = True) -> ibase.CheckResult:
        reason = ibase.Reason.CHECKED if ok else ibase.Reason.TLS_ERROR
        return ibase.CheckResult(ok, reason, "", 3, transport=transport)

    verified = policy.encrypted_condition(result(ibase.Transport.TLS_VERIFIED), pg)
    assert verified is not None
    assert (verified.type, verified.status, verified.reason) == ("Encrypted", TRUE, "TlsVerified")
    unverified = policy.encrypted_condition(result(ibase.Transport.TLS_UNVERIFIED), pg)
    assert unverified is not None
    assert (unverified.status, unverified.reason) == (TRUE, "TlsNotVerified")
    assert "ca.crt" in unverified.message
    plain = policy.encrypted_condition(result(ibase.Transport.PLAINTEXT), pg)
    assert plain is not None
    assert (plain.status, plain.reason) == (FALSE, "PlaintextConnection")
    assert "sslMode" in plain.message
    redis_plain = policy.encrypted_condition(result(ibase.Transport.PLAINTEXT), SPEC)
    assert redis_plain is not None
    assert "spec.redis.tls" in redis_plain.message
    # Not a datastore, or a failed check: no claim either way.
    assert policy.encrypted_condition(result(None), SPEC) is None
    assert policy.encrypted_condition(result(ibase.Transport.PLAINTEXT, ok=False), pg) is None


@pytest.mark.parametrize(
    ("before", "now", "event"),
    [
        (None, CHECKED, ("Normal", "Checked")),
        (FAILED, CHECKED, ("Normal", "Recovered")),
        (CHECKED, FAILED, ("Warning", "Unreachable")),
        (None, FAILED, ("Warning", "Unreachable")),
        (CHECKED, CHECKED, None),
        (FAILED, {**FAILED, "reason": "Timeout"}, None),  # reason changed, Ready did not flip
    ],
)
def test_an_event_only_when_ready_flips(
    before: dict[str, str] | None, now: dict[str, str], event: tuple[str, str] | None
) -> None:
    ready = Cond("Ready", now["status"], now["reason"], "m")
    got = policy.ready_event(before, ready)
    assert (None if got is None else (got.type, got.reason)) == event
