"""Which event wakes which reconciler: the watches each reconciler declares, and the
controller that routes kopf's events through them to the work queues.

The table below is the operator's event map, written out: for an event in a given
store, the (queue, key, delay, forget) requests that must follow, nothing more. The
routing test runs the real `Controller.on_event` with the queues' methods recorded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from bmad_operator import controller, kube, settings, store, watching
from bmad_operator import handlers as kopf_handlers
from bmad_operator.reconcilers import agent as agent_reconciler
from bmad_operator.reconcilers import integration as integration_reconciler
from bmad_operator.reconcilers import tenant as tenant_reconciler
from bmad_operator.reconcilers import workflow as workflow_reconciler

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


class Sent(NamedTuple):
    queue: str
    key: tuple[str, str]
    delay: float = 0.0
    forget: bool = False


def obj(kind: str, name: str, namespace: str | None = None, **extra: Any) -> Obj:
    metadata: Obj = {"name": name, "uid": f"uid-{kind}-{name}", "resourceVersion": "1"}
    if namespace is not None:
        metadata["namespace"] = namespace
    labels = extra.pop("labels", None)
    if labels:
        metadata["labels"] = labels
    return {"kind": kind, "metadata": metadata, **extra}


def world_objects() -> list[Obj]:
    """Tenant acme owns team-a and team-b; team-c belongs to nobody."""
    return [
        obj("Tenant", "acme", spec={"namespaces": ["team-a", "team-b"]}),
        obj("Namespace", "team-a", labels={"bmad.dev/tenant": "acme"}),
        obj("Namespace", "team-b", labels={"bmad.dev/tenant": "acme"}),
        obj("Namespace", "team-c"),
        obj("Agent", "mary", "team-a", spec={"integrations": ["db"]}),
        obj("Agent", "john", "team-b", spec={"integrations": ["db", "llm"]}),
        obj("Agent", "quinn", "team-c", spec={"integrations": ["db"]}),
        obj("Integration", "db", "team-a", spec={"secretRef": {"name": "db-creds"}}),
        obj("Integration", "db", "team-b", spec={"secretRef": {"name": "db-creds"}}),
        obj("Integration", "llm", "team-b", spec={"secretRef": {"name": "llm-creds"}}),
        obj("Workflow", "todo", "team-a", spec={"steps": [{"id": "a", "agent": "mary"}]}),
        obj(
            "Workflow",
            "done",
            "team-b",
            spec={"steps": [{"id": "a", "agent": "john"}]},
            status={"phase": "Succeeded"},
        ),
    ]


def world() -> store.Store:
    cache = store.Store()
    for item in world_objects():
        cache.put(item)
    return cache


def event(type_: str | None, body: Obj) -> Obj:
    return {"type": type_, "object": body}


AGENT_LABEL = {"bmad.dev/agent": "mary", "app.kubernetes.io/managed-by": "bmad-operator"}

CASES: dict[str, tuple[Obj, list[Sent]]] = {
    "agent changed: itself, its tenant's usage, the running workflows naming it": (
        event("MODIFIED", obj("Agent", "mary", "team-a")),
        [
            Sent("Agent", ("team-a", "mary")),
            Sent("Tenant", ("", "acme")),
            Sent("Workflow", ("team-a", "todo")),
        ],
    ),
    "agent named only by a finished workflow": (
        event("MODIFIED", obj("Agent", "john", "team-b")),
        [Sent("Agent", ("team-b", "john")), Sent("Tenant", ("", "acme"))],
    ),
    "agent in no tenant's namespace": (
        event("ADDED", obj("Agent", "quinn", "team-c")),
        [Sent("Agent", ("team-c", "quinn"))],
    ),
    "agent deleted: its retries forgotten, its tenant recounted, its workflows told": (
        event("DELETED", obj("Agent", "mary", "team-a")),
        [
            Sent("Agent", ("team-a", "mary"), forget=True),
            Sent("Tenant", ("", "acme")),
            Sent("Workflow", ("team-a", "todo")),
        ],
    ),
    "workflow changed: itself": (
        event("MODIFIED", obj("Workflow", "todo", "team-a")),
        [Sent("Workflow", ("team-a", "todo"))],
    ),
    "workflow deleted: its timers forgotten": (
        event("DELETED", obj("Workflow", "todo", "team-a")),
        [Sent("Workflow", ("team-a", "todo"), forget=True)],
    ),
    "initial listing (no type) is a change": (
        event(None, obj("Agent", "quinn", "team-c")),
        [Sent("Agent", ("team-c", "quinn"))],
    ),
    "owned deployment: its agent, after the gathering delay": (
        event("MODIFIED", obj("Deployment", "mary", "team-a", labels=AGENT_LABEL)),
        [Sent("Agent", ("team-a", "mary"), delay=0.3)],
    ),
    "owned object of an agent the store does not know": (
        event("MODIFIED", obj("Service", "mary", "team-b", labels=AGENT_LABEL)),
        [],
    ),
    "deployment that is not an agent's": (
        event("MODIFIED", obj("Deployment", "web", "team-a")),
        [],
    ),
    "tenant changed: itself and every agent in its namespaces": (
        event("MODIFIED", obj("Tenant", "acme")),
        [
            Sent("Agent", ("team-a", "mary")),
            Sent("Agent", ("team-b", "john")),
            Sent("Tenant", ("", "acme")),
        ],
    ),
    "tenant deleted: queued for its finalizer's work": (
        event("DELETED", obj("Tenant", "acme")),
        [
            Sent("Agent", ("team-a", "mary")),
            Sent("Agent", ("team-b", "john")),
            Sent("Tenant", ("", "acme")),
        ],
    ),
    "namespace labelled for a tenant: its agents and running workflows (their tenant's "
    "bus keys), and the tenant": (
        event("MODIFIED", obj("Namespace", "team-a", labels={"bmad.dev/tenant": "acme"})),
        [
            Sent("Agent", ("team-a", "mary")),
            Sent("Tenant", ("", "acme")),
            Sent("Workflow", ("team-a", "todo")),
        ],
    ),
    "namespace relabelled with a finished workflow only: no workflow pass": (
        event("MODIFIED", obj("Namespace", "team-b", labels={"bmad.dev/tenant": "other"})),
        [Sent("Agent", ("team-b", "john")), Sent("Tenant", ("", "other"))],
    ),
    "namespace of nobody: its agents (their tenant is the namespace)": (
        event("MODIFIED", obj("Namespace", "team-c")),
        [Sent("Agent", ("team-c", "quinn"))],
    ),
    **{
        f"{kind} of a tenant: drift put back": (
            event("MODIFIED", obj(kind, "x", "team-a", labels={"bmad.dev/tenant": "acme"})),
            [Sent("Tenant", ("", "acme"))],
        )
        for kind in ("ResourceQuota", "LimitRange", "NetworkPolicy", "RoleBinding")
    },
    "integration changed: itself, the agents that bind it, the running workflows": (
        event("MODIFIED", obj("Integration", "db", "team-a")),
        [
            Sent("Agent", ("team-a", "mary")),
            Sent("Integration", ("team-a", "db")),
            Sent("Workflow", ("team-a", "todo")),
        ],
    ),
    "integration deleted: retries forgotten, one last pass": (
        event("DELETED", obj("Integration", "llm", "team-b")),
        [
            Sent("Agent", ("team-b", "john")),
            Sent("Integration", ("team-b", "llm"), forget=True),
            Sent("Integration", ("team-b", "llm")),
        ],
    ),
    "binding secret: the agents that mount it": (
        event(
            "MODIFIED",
            obj(
                "Secret",
                "db-binding",
                "team-b",
                labels={
                    "bmad.dev/integration": "db",
                    "app.kubernetes.io/managed-by": "bmad-operator",
                },
            ),
        ),
        [Sent("Agent", ("team-b", "john"))],
    ),
    "binding secret published: the running workflows of its namespace (a task bus URL)": (
        event(
            "ADDED",
            obj(
                "Secret",
                "db-binding",
                "team-a",
                labels={
                    "bmad.dev/integration": "db",
                    "app.kubernetes.io/managed-by": "bmad-operator",
                },
            ),
        ),
        [Sent("Agent", ("team-a", "mary")), Sent("Workflow", ("team-a", "todo"))],
    ),
    # Users' Secrets are not watched; were one to arrive, it would queue nothing: an
    # Integration reads its credentials Secret by name on each of its passes.
    "credentials secret: nothing (read by name on each pass, never watched)": (
        event("MODIFIED", obj("Secret", "db-creds", "team-b", data={"password": "cDQ1NQ=="})),
        [],
    ),
    "a secret nobody references": (
        event("ADDED", obj("Secret", "other", "team-a", data={"k": "dg=="})),
        [],
    ),
    "an event that names no object": ({"type": "ADDED", "object": {"kind": "Agent"}}, []),
}


def declarations(cache: store.Store) -> dict[str, list[watching.Watch]]:
    api = FakeKube()
    return {
        "Agent": agent_reconciler.AgentReconciler(
            api=api,  # type: ignore[arg-type]
            cache=cache,
            runtime_image="img",
        ).watches(),
        "Integration": integration_reconciler.IntegrationReconciler(
            api=api,  # type: ignore[arg-type]
            cache=cache,
        ).watches(),
        "Tenant": tenant_reconciler.TenantReconciler(
            api=api,  # type: ignore[arg-type]
            cache=cache,
            operator_namespace="bmad-system",
        ).watches(),
        "Workflow": workflow_reconciler.WorkflowReconciler(
            api=api,  # type: ignore[arg-type]
            cache=cache,
        ).watches(),
    }


def _sorted(sent: list[Sent]) -> list[Sent]:
    # Order matters within one queue (forget before the last pass), not across queues.
    return sorted(sent, key=lambda s: s.queue)


@pytest.mark.parametrize(("raw", "expected"), CASES.values(), ids=list(CASES))
def test_the_declared_watches_map_each_event_to_exactly_these_keys(
    raw: Obj, expected: list[Sent]
) -> None:
    cache = world()
    parsed = watching.parse(raw)
    sent: list[Sent] = []
    if parsed is not None:
        for queue, declared in declarations(cache).items():
            for request in watching.requests(declared, parsed):
                sent.append(Sent(queue, request.key, request.delay, request.forget))
    assert _sorted(sent) == _sorted(expected)


class Recorded(NamedTuple):
    queue: str
    verb: str
    key: Any
    delay: float | None


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> tuple[controller.Controller, list[Recorded]]:
    ctl = controller.Controller(FakeKube(), settings.OperatorSettings())  # type: ignore[arg-type]
    ctl._leading = True  # as after start(), without its worker tasks
    for item in world_objects():
        ctl.store.put(item)
    calls: list[Recorded] = []
    for queue in (ctl.agent_queue, ctl.integration_queue, ctl.tenant_queue, ctl.workflow_queue):

        def recorder(verb: str, name: str = queue.kind) -> Any:
            def record(key: Any, delay: float | None = None) -> None:
                calls.append(Recorded(name, verb, key, delay))

            return record

        monkeypatch.setattr(queue, "add", recorder("add"))
        monkeypatch.setattr(queue, "add_after", recorder("add_after"))
        monkeypatch.setattr(queue, "forget", recorder("forget"))
    return ctl, calls


@pytest.mark.parametrize(("raw", "expected"), CASES.values(), ids=list(CASES))
def test_the_controller_routes_each_event_to_the_queues_as_declared(
    routed: tuple[controller.Controller, list[Recorded]], raw: Obj, expected: list[Sent]
) -> None:
    ctl, calls = routed
    ctl.on_event(raw)
    want = [
        Recorded(
            s.queue,
            "forget" if s.forget else "add_after" if s.delay else "add",
            s.key,
            s.delay or None,
        )
        for s in expected
    ]
    assert sorted(calls, key=lambda r: r.queue) == sorted(want, key=lambda r: r.queue)


def test_a_standby_keeps_its_store_current_and_queues_nothing(
    routed: tuple[controller.Controller, list[Recorded]],
) -> None:
    """Leader election: a replica that does not lead reconciles nothing, but its store
    follows every event (it serves the webhook, and takes over from a warm cache)."""
    ctl, calls = routed
    ctl._leading = False
    for raw, _ in CASES.values():
        ctl.on_event(raw)
    ctl.on_event(event("ADDED", obj("Agent", "newcomer", "team-a")))

    assert calls == []
    assert ctl.store.get("Agent", "team-a", "newcomer") is not None


def test_the_store_follows_events_and_keeps_no_data_of_users_secrets(
    routed: tuple[controller.Controller, list[Recorded]],
) -> None:
    ctl, _ = routed
    ctl.on_event(event("ADDED", obj("Secret", "db-creds", "team-a", data={"password": "c2VjcmV0"})))
    kept = ctl.store.get("Secret", "team-a", "db-creds")
    assert kept is not None
    assert "data" not in kept
    assert kept["metadata"]["resourceVersion"] == "1"
    ours = obj(
        "Secret",
        "db-binding",
        "team-a",
        labels={"app.kubernetes.io/managed-by": "bmad-operator"},
        data={"uri": "cmVkaXM6Ly8="},
    )
    ctl.on_event(event("ADDED", ours))
    assert (ctl.store.get("Secret", "team-a", "db-binding") or {}).get("data") == ours["data"]
    ctl.on_event(event("DELETED", obj("Agent", "mary", "team-a")))
    assert ctl.store.get("Agent", "team-a", "mary") is None


def test_every_kind_kopf_feeds_is_declared_by_a_reconciler_and_back() -> None:
    plural_to_kind = {info.plural: kind for kind, info in kube.RESOURCES.items()}
    fed = {plural_to_kind[plural] for _, _, plural, _ in kopf_handlers.WATCHED}
    declared = set().union(*(watching.kinds(d) for d in declarations(world()).values()))
    assert fed == declared
    # Owned objects are fed only when they carry our managed-by label.
    owned = {plural_to_kind[plural] for _, _, plural, ours in kopf_handlers.WATCHED if ours}
    assert set(agent_reconciler.OWNED_KINDS) <= owned
