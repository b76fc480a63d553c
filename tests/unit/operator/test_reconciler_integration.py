"""`reconcilers.integration.IntegrationReconciler` against the in-memory API server.

The service check itself (`bmad_integrations.checks.check_integration`, a network
round trip) is replaced by a scripted one that records what it was asked; the real
checks run against real services in tests/integration/operator/test_integrations.py.
What is tested here is the reconciler: when it checks, what it writes, which binding
it publishes or keeps, which events it posts, and when it asks to run again.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Hashable, Mapping
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import base as ibase
from bmad_integrations import checks
from bmad_operator import store
from bmad_operator.builders import integration as builders
from bmad_operator.reconcilers import integration as integration_reconciler

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NS = "team-a"
NAME = "cache"
INTERVAL = 60


class ScriptedCheck:
    """Stands in for `checks.check_integration`: returns the next scripted result."""

    def __init__(self) -> None:
        self.results: list[ibase.CheckResult] = []
        self.calls: list[dict[str, Any]] = []

    def ok(self) -> None:
        self.results.append(ibase.CheckResult(True, ibase.Reason.CHECKED, "", 12, "7.2.4"))

    def fail(self, reason: ibase.Reason, message: str) -> None:
        self.results.append(ibase.CheckResult(False, reason, message, 30))

    async def __call__(
        self,
        spec: integration_api.IntegrationSpec,
        secret_data: Mapping[str, bytes] | None,
        *,
        secret_found: bool,
        timeout: float,  # noqa: ASYNC109 - the signature of the function it replaces
        **more: Any,  # what else the real check is given (an egress policy, ...)
    ) -> ibase.CheckResult:
        self.calls.append({"spec": spec, "data": secret_data, "found": secret_found})
        assert self.results, "a check nobody expected"
        return self.results.pop(0)


class Requeues:
    """Stands in for the work queue: what the reconciler scheduled, and when."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[Hashable, float]] = []

    def add_after(self, key: Hashable, delay: float) -> None:
        self.scheduled.append((key, delay))


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch) -> ScriptedCheck:
    scripted = ScriptedCheck()
    monkeypatch.setattr(checks, "check_integration", scripted)
    return scripted


class Harness:
    def __init__(self, *, secret: Mapping[str, str] | None = None) -> None:
        self.api = FakeKube()
        self.cache = store.Store()
        self.queue = Requeues()
        self.reconciler = integration_reconciler.IntegrationReconciler(
            api=self.api,  # type: ignore[arg-type]
            cache=self.cache,
        )
        self.reconciler.queue = self.queue  # type: ignore[assignment]
        self.seed(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Integration",
                "metadata": {"name": NAME, "namespace": NS, "uid": "uid-int", "generation": 1},
                "spec": {
                    "type": "redis",
                    "secretRef": {"name": "cache-creds"},
                    "redis": {"host": "10.0.0.7", "port": 6380},
                    "checkIntervalSeconds": INTERVAL,
                },
            }
        )
        if secret is not None:
            self.set_secret(secret)

    def seed(self, obj: Obj) -> None:
        self.api.seed(obj, self.cache)

    def set_secret(self, data: Mapping[str, str]) -> None:
        """Create or change the credentials Secret (the next pass reads it)."""
        self.seed(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "cache-creds", "namespace": NS},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
            }
        )

    def update_spec(self, **change: Any) -> None:
        obj = self.api.objects[("Integration", NS, NAME)]
        obj["spec"].update(change)
        obj["metadata"]["generation"] += 1
        obj["metadata"]["resourceVersion"] = self.api.next_rv()
        self.cache.put(copy.deepcopy(obj))

    async def run(self) -> None:
        self.api.reset()
        self.queue.scheduled.clear()
        await self.reconciler.reconcile((NS, NAME))

    def status(self) -> Obj:
        obj = self.cache.get("Integration", NS, NAME)
        assert obj is not None
        status: Obj = obj.get("status") or {}
        return status

    def ready(self) -> tuple[str, str, str]:
        (cond,) = [c for c in self.status()["conditions"] if c["type"] == "Ready"]
        return cond["status"], cond["reason"], cond["message"]

    def events(self) -> list[tuple[str, str]]:
        return [(e["type"], e["reason"]) for e in self.api.events]

    def delay(self) -> float:
        ((key, delay),) = self.queue.scheduled
        assert key == (NS, NAME)
        return delay


async def test_a_good_check_publishes_the_binding_the_builder_renders(check: ScriptedCheck) -> None:
    h = Harness(secret={"password": "s3cret"})
    check.ok()
    await h.run()
    (call,) = check.calls
    assert call["found"] is True
    assert call["data"] == {"password": b"s3cret"}
    (binding,) = h.api.applied
    body = h.api.objects[("Integration", NS, NAME)]
    spec = integration_api.IntegrationSpec.model_validate(body["spec"])
    assert binding == builders.binding_secret(
        body, "redis", checks.binding_data(spec, {"password": b"s3cret"})
    )
    status = h.status()
    assert status["bindingSecretName"] == "cache-binding"
    assert status["observedGeneration"] == 1
    assert status["latencyMs"] == 12
    assert status["serverVersion"] == "7.2.4"
    assert status["lastCheckTime"]
    assert h.ready()[:2] == ("True", "Checked")
    assert len(h.api.verbs("patch_status")) == 1
    assert h.events() == [("Normal", "Checked")]
    # Healthy: checked again after the interval, with jitter.
    assert 0.9 * INTERVAL <= h.delay() <= 1.1 * INTERVAL


async def test_our_own_status_write_coming_back_checks_nothing(check: ScriptedCheck) -> None:
    h = Harness(secret={"password": "s3cret"})
    check.ok()
    await h.run()
    first_delay = h.delay()
    await h.run()  # the watch event of our own status write
    assert len(check.calls) == 1
    # Only the credentials Secret is read (users' Secrets are polled, never watched).
    assert h.api.calls == [("get", "Secret", "cache-creds")]
    # Still due when it was: rescheduled for the time left, not a fresh interval.
    assert 0 < h.delay() <= first_delay


@pytest.mark.parametrize("change", ["secret", "spec"])
async def test_a_changed_secret_or_spec_is_checked_at_once(
    check: ScriptedCheck, change: str
) -> None:
    h = Harness(secret={"password": "s3cret"})
    check.ok()
    await h.run()
    if change == "secret":
        h.set_secret({"password": "rotated"})
    else:
        h.update_spec(redis={"host": "10.0.0.8", "port": 6380})
    check.ok()
    await h.run()
    assert len(check.calls) == 2
    assert h.api.applied, "the binding follows the new secret or spec"
    assert h.events() == []  # Ready did not flip


async def test_a_failed_check_keeps_the_last_good_binding_and_backs_off(
    check: ScriptedCheck,
) -> None:
    h = Harness(secret={"password": "s3cret"})
    check.ok()
    await h.run()
    h.set_secret({"password": "wrong"})
    check.fail(ibase.Reason.AUTHENTICATION_FAILED, "the server refused the password")
    await h.run()
    assert h.api.applied == []  # agents keep the working credentials
    assert h.status()["bindingSecretName"] == "cache-binding"
    assert h.ready() == ("False", "AuthenticationFailed", "the server refused the password")
    assert h.events() == [("Warning", "AuthenticationFailed")]
    assert 0.9 * 5 <= h.delay() <= 1.1 * 5  # the first retry: 5 s, not the interval
    # Still failing: the backoff grows (10 s), and no second event (Ready did not flip).
    h.set_secret({"password": "still-wrong"})
    check.fail(ibase.Reason.AUTHENTICATION_FAILED, "the server refused the password")
    await h.run()
    assert 0.9 * 10 <= h.delay() <= 1.1 * 10
    assert h.events() == []
    # Fixed: Recovered, and back to the interval.
    h.set_secret({"password": "s3cret"})
    check.ok()
    await h.run()
    assert h.events() == [("Normal", "Recovered")]
    assert h.delay() >= 0.9 * INTERVAL


async def test_a_missing_secret_is_checked_as_not_found(check: ScriptedCheck) -> None:
    h = Harness(secret=None)
    check.fail(ibase.Reason.SECRET_NOT_FOUND, "Secret cache-creds does not exist")
    await h.run()
    (call,) = check.calls
    assert call["found"] is False
    assert call["data"] is None
    assert h.ready()[:2] == ("False", "SecretNotFound")
    assert "bindingSecretName" not in h.status()


async def test_an_invalid_spec_is_a_condition_and_checks_nothing(check: ScriptedCheck) -> None:
    h = Harness(secret={"password": "s3cret"})
    h.update_spec(type="nosuchtype")
    await h.run()
    assert check.calls == []
    assert h.api.applied == []
    status, reason, message = h.ready()
    assert (status, reason) == ("False", "InvalidConfiguration")
    assert "spec.type" in message
    assert h.events() == [("Warning", "InvalidConfiguration")]
    assert h.queue.scheduled == []


async def test_a_deleted_integration_forgets_its_last_check(check: ScriptedCheck) -> None:
    h = Harness(secret={"password": "s3cret"})
    check.ok()
    await h.run()
    h.cache.remove("Integration", NS, NAME)
    await h.run()
    assert h.api.calls == []
    # Created again with the same name: a fresh check, not "already checked".
    h.seed(h.api.objects[("Integration", NS, NAME)])
    check.ok()
    await h.run()
    assert len(check.calls) == 2


async def test_name_conflict_a_foreign_secret_named_like_the_binding_is_left_untouched(
    check: ScriptedCheck,
) -> None:
    """Hole 9: a Secret `<integration>-binding` that the operator did not create was
    overwritten with the binding and given the Integration as owner.

    On the code before the fix:
        assert h.api.applied == []
        AssertionError: assert [{'apiVersion': 'v1', 'kind': 'Secret', ...
    """
    h = Harness(secret={"password": "s3cret"})
    before: Obj = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cache-binding", "namespace": NS, "uid": "uid-theirs"},
        "data": {"theirs": base64.b64encode(b"keep me").decode()},
    }
    h.api.objects[("Secret", NS, "cache-binding")] = copy.deepcopy(before)
    check.ok()
    await h.run()
    assert h.api.applied == []
    assert h.api.objects[("Secret", NS, "cache-binding")] == before
    status, reason, message = h.ready()
    assert (status, reason) == ("False", "NameConflict")
    assert "Secret/cache-binding" in message
    assert "bindingSecretName" not in h.status()
    assert h.events() == [("Warning", "NameConflict")]
    # Once it is gone, the next check publishes the binding.
    del h.api.objects[("Secret", NS, "cache-binding")]
    h.update_spec(checkIntervalSeconds=INTERVAL + 1)  # a change: checked at once
    check.ok()
    await h.run()
    (binding,) = h.api.applied
    assert binding["metadata"]["ownerReferences"][0]["uid"] == "uid-int"
    assert h.ready()[:2] == ("True", "Checked")
