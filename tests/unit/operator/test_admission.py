"""The budget webhook: its decision (`policies.budget`), its configuration and TLS Secret
(`builders.webhook`), and its I/O (`admission`) against the in-memory API server.

The same webhook against the real API server, in parallel and across restarts, is in
tests/integration/operator/test_budget_webhook.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest

from bmad_operator import admission
from bmad_operator.builders import webhook as builders
from bmad_operator.policies import budget
from bmad_operator.workflows import approvals

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
TENANT = "acme"


# -- the decision -------------------------------------------------------------------------


def _create(name: str, replicas: int = 1, ns: str = "a") -> budget.Change:
    return budget.Change((ns, name), True, 0, replicas)


def _resize(name: str, old: int, new: int, ns: str = "a") -> budget.Change:
    return budget.Change((ns, name), False, old, new)


USAGE = {("a", "one"): 2, ("b", "two"): 1}


def test_a_third_agent_over_a_budget_of_two_is_refused_naming_the_budget() -> None:
    problem = budget.violation(TENANT, budget.Limits(2, None), USAGE, _create("three"))
    assert problem is not None
    assert "spec.limits.agents" in problem
    assert "tenant acme allows 2 Agents" in problem
    assert "would make 3" in problem


def test_replica_budget_counts_every_namespace_and_the_change_once() -> None:
    limits = budget.Limits(None, 4)
    assert budget.violation(TENANT, limits, USAGE, _create("three", 1)) is None
    problem = budget.violation(TENANT, limits, USAGE, _create("three", 2))
    assert problem is not None
    assert "spec.limits.replicas" in problem
    assert "would make 5" in problem
    # The Agent being resized counts with its new size only.
    assert budget.violation(TENANT, limits, USAGE, _resize("one", 2, 3)) is None
    assert budget.violation(TENANT, limits, USAGE, _resize("one", 2, 4)) is not None


@pytest.mark.parametrize(
    "change",
    [_resize("one", 2, 1), _resize("one", 2, 2), _resize("one", 2, 0)],
    ids=["scale-down", "same-size", "to-zero"],
)
def test_a_change_that_does_not_raise_usage_is_never_refused_even_over_budget(
    change: budget.Change,
) -> None:
    over = budget.Limits(agents=1, replicas=1)  # the tenant is over both already
    assert not budget.raises_usage(change)
    assert budget.violation(TENANT, over, USAGE, change) is None


def test_updating_an_existing_agent_does_not_count_it_as_a_new_one() -> None:
    # Over the Agent budget (2 Agents, budget 1) but growing within the replica budget.
    assert budget.violation(TENANT, budget.Limits(1, 10), USAGE, _resize("one", 2, 3)) is None


def test_replicas_as_counted() -> None:
    assert budget.agent_replicas({}) == 1
    assert budget.agent_replicas(None) == 1
    assert budget.agent_replicas({"replicas": 0}) == 0
    assert budget.agent_replicas({"replicas": 7}) == 7
    assert budget.Limits.of({"limits": {"agents": 3}}) == budget.Limits(3, None)
    assert not budget.Limits.of({}).any


# -- the configuration ----------------------------------------------------------------------

OWNER: Obj = {"metadata": {"name": "bmad-system", "uid": "uid-bmad-system"}}


def test_configuration_sends_only_growth_from_tenant_namespaces_and_fails_closed() -> None:
    cert = admission.self_signed("127.0.0.1")
    config = builders.configuration(cert.cert_pem, owner=OWNER, url="https://127.0.0.1:9443")
    hook, scale_hook = config["webhooks"]
    assert hook["rules"][0]["resources"] == ["agents"]
    assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    assert scale_hook["rules"][0]["resources"] == ["agents/scale"]
    assert scale_hook["rules"][0]["operations"] == ["UPDATE"]
    for webhook in (hook, scale_hook):
        assert webhook["failurePolicy"] == "Fail"
        assert webhook["namespaceSelector"]["matchExpressions"][0]["key"] == "bmad.dev/tenant"
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == cert.cert_pem
        (condition,) = webhook["matchConditions"]
        assert condition["name"] == "raises-usage"
    assert "request.operation == 'CREATE'" in hook["matchConditions"][0]["expression"]
    assert "object.spec.replicas" in scale_hook["matchConditions"][0]["expression"]
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:9443/agent-budget"
    assert scale_hook["clientConfig"]["url"] == "https://127.0.0.1:9443/agent-budget-scale"
    # Owned by the operator's namespace: uninstalling it removes the configuration.
    assert config["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Namespace", "name": "bmad-system", "uid": "uid-bmad-system"}
    ]


def test_configuration_in_a_cluster_goes_through_the_service() -> None:
    cert = admission.self_signed("bmad-operator-webhook.bmad-system.svc")
    config = builders.configuration(
        cert.cert_pem, owner=OWNER, service="bmad-system/bmad-operator-webhook"
    )
    assert config["webhooks"][0]["clientConfig"]["service"] == {
        "namespace": "bmad-system",
        "name": "bmad-operator-webhook",
        "path": "/agent-budget",
        "port": 443,
    }
    assert "url" not in config["webhooks"][0]["clientConfig"]


# -- the certificate ------------------------------------------------------------------------


async def test_the_certificate_is_made_once_then_reused_from_its_secret() -> None:
    api = FakeKube()
    first = await admission.ensure_certificate(api, namespace="bmad-system", host="127.0.0.1")
    (created,) = api.created
    assert created["metadata"]["name"] == "bmad-operator-webhook-tls"
    assert created["type"] == "kubernetes.io/tls"
    assert base64.b64decode(created["data"]["ca.crt"]) == first.cert_pem
    api.reset()
    again = await admission.ensure_certificate(api, namespace="bmad-system", host="127.0.0.1")
    assert again == first
    assert api.calls == [("get", "Secret", "bmad-operator-webhook-tls")]  # read, not written


async def test_a_certificate_for_another_host_or_expiring_is_replaced_conditionally() -> None:
    api = FakeKube()
    old = await admission.ensure_certificate(api, namespace="bmad-system", host="127.0.0.1")
    rv = api.find("Secret", "bmad-system", "bmad-operator-webhook-tls")["metadata"][
        "resourceVersion"
    ]
    new = await admission.ensure_certificate(
        api, namespace="bmad-system", host="bmad-operator-webhook.bmad-system.svc"
    )
    assert new != old
    ((kind, _, patch),) = api.patches
    assert kind == "Secret"
    assert patch["metadata"]["resourceVersion"] == rv
    stored = admission.from_secret(api.find("Secret", "bmad-system", "bmad-operator-webhook-tls"))
    assert stored == new
    now = dt.datetime.now(dt.UTC)
    assert admission.usable(new, "bmad-operator-webhook.bmad-system.svc", now=now)
    assert not admission.usable(new, "127.0.0.1", now=now)
    assert not admission.usable(
        new, "bmad-operator-webhook.bmad-system.svc", now=now + admission.VALIDITY
    )


async def test_replicas_racing_for_the_certificate_all_serve_the_winners() -> None:
    api = FakeKube()
    winner = admission.self_signed("127.0.0.1")
    real_create = api.create

    async def create_after_another(obj: Obj) -> Obj:
        # Another replica stores its certificate between our read and our create.
        api.objects[("Secret", "bmad-system", "bmad-operator-webhook-tls")] = builders.tls_secret(
            "bmad-system", winner.cert_pem, winner.key_pem
        ) | {"metadata": {"name": "bmad-operator-webhook-tls", "resourceVersion": "7"}}
        return await real_create(obj)

    api.create = create_after_another  # type: ignore[method-assign]
    served = await admission.ensure_certificate(api, namespace="bmad-system", host="127.0.0.1")
    assert served == winner


async def test_the_serving_check_verifies_the_handshake_as_the_api_server_would(
    tmp_path: Path,
) -> None:
    cert = admission.self_signed("127.0.0.1")
    certfile, keyfile = admission.write_files(cert, tmp_path)
    assert keyfile.stat().st_mode & 0o777 == 0o600
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        everywhere = "0.0.0.0"  # noqa: S104 - what it listens on; it connects to 127.0.0.1
        await admission.check_serving(
            admission.Endpoint(everywhere, port, "127.0.0.1", cert.cert_pem)
        )
        other = admission.self_signed("127.0.0.1")  # a caBundle the server does not match
        with pytest.raises(ssl.SSLError):
            await admission.check_serving(
                admission.Endpoint("127.0.0.1", port, "127.0.0.1", other.cert_pem)
            )
    with pytest.raises(ConnectionRefusedError):  # nobody listens, even after a while
        await admission.check_serving(
            admission.Endpoint("127.0.0.1", port, "127.0.0.1", cert.cert_pem), wait=0.3
        )

    # A webhook that opens its port a moment after the check started (as right after a
    # start): the check waits for it instead of failing the probe.
    async def serve_late() -> asyncio.Server:
        await asyncio.sleep(0.2)
        return await asyncio.start_server(answer, "127.0.0.1", port, ssl=context)

    late = asyncio.create_task(serve_late())
    await admission.check_serving(
        admission.Endpoint("127.0.0.1", port, "127.0.0.1", cert.cert_pem), wait=5
    )
    (await late).close()


# -- the webhook's reads and serialisation --------------------------------------------------


def _cluster(limits: Obj, agents: dict[tuple[str, str], int]) -> FakeKube:
    api = FakeKube()
    api.objects[("Tenant", "", TENANT)] = {
        "kind": "Tenant",
        "metadata": {"name": TENANT},
        "spec": {"namespaces": ["a", "b"], "limits": limits},
    }
    for ns in ("a", "b"):
        api.objects[("Namespace", "", ns)] = {
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"bmad.dev/tenant": TENANT}},
        }
    api.objects[("Namespace", "", "elsewhere")] = {
        "kind": "Namespace",
        "metadata": {"name": "elsewhere"},
    }
    for (ns, name), replicas in agents.items():
        api.objects[("Agent", ns, name)] = {
            "kind": "Agent",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas},
        }
    return api


async def test_the_webhook_counts_what_the_api_server_lists_with_no_cache_at_all() -> None:
    api = _cluster({"agents": 2, "replicas": 4}, USAGE)
    webhook = admission.BudgetWebhook(api)  # type: ignore[arg-type]
    problem = await webhook.review("a", _create("three"))
    assert problem is not None
    assert "spec.limits.agents" in problem
    assert ("list", "Namespace", "") in api.calls
    assert ("list", "Agent", "b") in api.calls  # every namespace of the tenant
    assert await webhook.review("elsewhere", _create("x", 50)) is None  # no tenant: no budget


async def test_a_change_that_lowers_usage_needs_no_read() -> None:
    api = _cluster({"agents": 0, "replicas": 0}, USAGE)
    webhook = admission.BudgetWebhook(api)  # type: ignore[arg-type]
    assert await webhook.review("a", _resize("one", 2, 1)) is None
    assert api.calls == []


async def test_creates_arriving_together_cannot_share_one_free_slot() -> None:
    """The API server stores an admitted create only after the webhook answered: until
    it lists it, the webhook remembers it, so 20 creates at once leave one slot to one."""
    api = _cluster({"agents": 3}, USAGE)
    clock = [0.0]
    webhook = admission.BudgetWebhook(api, hold_seconds=15, clock=lambda: clock[0])  # type: ignore[arg-type]
    answers = await asyncio.gather(*(webhook.review("a", _create(f"n{i}")) for i in range(20)))
    assert sum(answer is None for answer in answers) == 1
    # Not stored yet: it still counts, for another namespace of the tenant too.
    assert await webhook.review("b", _create("late")) is not None
    # An admitted create that never got stored (refused further on) stops counting.
    clock[0] = 16.0
    assert await webhook.review("b", _create("later")) is None
    # One that is stored counts from the listing, however long it takes.
    api.objects[("Agent", "b", "later")] = {
        "kind": "Agent",
        "metadata": {"name": "later", "namespace": "b"},
        "spec": {"replicas": 1},
    }
    clock[0] = 100.0
    assert await webhook.review("a", _create("last")) is not None


async def test_a_dry_run_reserves_nothing() -> None:
    api = _cluster({"agents": 3}, USAGE)
    webhook = admission.BudgetWebhook(api)  # type: ignore[arg-type]
    assert await webhook.review("a", _create("try"), dry_run=True) is None
    assert await webhook.review("a", _create("real")) is None


class _SlowKube(FakeKube):
    """Lists take a turn of the event loop, as a real API server's do."""

    async def list(self, kind: str, namespace: str | None = None, selector: str = "") -> list[Obj]:
        await asyncio.sleep(0.01)
        return await super().list(kind, namespace, selector)


async def test_reviews_waiting_their_turn_share_one_listing_taken_after_they_arrived() -> None:
    """A burst costs a few listings, not one per review (each review waits for the ones
    before it, and the API server gives up after its timeout); still one slot, one Agent."""
    api = _SlowKube()
    api.objects.update(_cluster({"agents": 3}, USAGE).objects)
    webhook = admission.BudgetWebhook(api)  # type: ignore[arg-type]
    answers = await asyncio.gather(*(webhook.review("a", _create(f"n{i}")) for i in range(20)))
    assert sum(answer is None for answer in answers) == 1
    assert 1 <= len([c for c in api.calls if c == ("list", "Agent", "a")]) <= 2
    # A review that arrives after that listing gets a listing of its own, which sees an
    # Agent deleted meanwhile.
    del api.objects[("Agent", "b", "two")]
    before = len(api.verbs("list"))
    assert await webhook.review("a", _create("next")) is None
    assert len(api.verbs("list")) > before


def test_configuration_reviews_workflows_naming_approvers_in_any_namespace() -> None:
    cert = admission.self_signed("127.0.0.1")
    config = builders.configuration(
        cert.cert_pem,
        owner=OWNER,
        url="https://127.0.0.1:9443",
        approvers=(approvals.WEBHOOK_ID, approvals.MATCH_CONDITION),
    )
    _, _, approvers_hook = config["webhooks"]
    assert approvers_hook["rules"][0]["resources"] == ["workflows"]
    assert approvers_hook["clientConfig"]["url"] == "https://127.0.0.1:9443/workflow-approvers"
    assert "namespaceSelector" not in approvers_hook  # Workflows in any namespace...
    [condition] = approvers_hook["matchConditions"]  # ...that name approvers
    assert "approvers" in condition["expression"]
