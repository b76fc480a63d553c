"""`reconcilers.tenant.TenantReconciler` against the in-memory API server.

Each test drives passes by hand and checks what the reconciler sent: the finalizer,
the namespaces and their fences, what it pruned or released, the status (written
once) and the events. Stripe is a recording stand-in for `bmad_integrations.billing`
(the real client is exercised against stripe-mock by the integration tests).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
from typing import Any

import pytest

from bmad_integrations import billing, stripe_webhooks
from bmad_integrations.usage import budget as usage_budget
from bmad_integrations.usage import periods as usage_periods
from bmad_integrations.usage import reporter as usage_reporter
from bmad_integrations.usage import store as usage_store
from bmad_operator import errors, store
from bmad_operator.reconcilers import tenant as tenant_reconciler

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NAME = "acme"
SYSTEM_NS = "bmad-system"
FENCES = [
    "LimitRange",
    "NetworkPolicy",
    "NetworkPolicy",
    "NetworkPolicy",
    "NetworkPolicy",
]


class FakeStripe:
    """What the reconciler asks of Stripe, recorded; ids derived from the tenant."""

    def __init__(self) -> None:
        self.customers: list[dict[str, Any]] = []
        self.subscriptions: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.fail: billing.BillingError | None = None

    async def ensure_customer(self, account: billing.StripeAccount, **kw: Any) -> str:
        if self.fail:
            raise self.fail
        self.customers.append({"account": account, **kw})
        return f"cus_{kw['tenant']}"

    async def ensure_subscription(self, account: billing.StripeAccount, **kw: Any) -> str:
        self.subscriptions.append({"account": account, **kw})
        return f"sub_{kw['tenant']}"

    async def cancel_subscription(self, account: billing.StripeAccount, sub: str) -> None:
        if self.fail:
            raise self.fail
        self.cancelled.append(sub)


@pytest.fixture
def stripe(monkeypatch: pytest.MonkeyPatch) -> FakeStripe:
    fake = FakeStripe()
    monkeypatch.setattr(billing, "ensure_customer", fake.ensure_customer)
    monkeypatch.setattr(billing, "ensure_subscription", fake.ensure_subscription)
    monkeypatch.setattr(billing, "cancel_subscription", fake.cancel_subscription)
    return fake


class Harness:
    """One Tenant, its fake API server, the operator's store and the reconciler."""

    def __init__(self, spec: Obj) -> None:
        self.api = FakeKube()
        self.cache = store.Store()
        self.reconciler = tenant_reconciler.TenantReconciler(
            api=self.api,  # type: ignore[arg-type]
            cache=self.cache,
            operator_namespace=SYSTEM_NS,
        )
        self.seed(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Tenant",
                "metadata": {"name": NAME, "uid": "uid-tenant-acme", "generation": 1},
                "spec": copy.deepcopy(spec),
            }
        )

    def seed(self, obj: Obj) -> None:
        self.api.seed(obj, self.cache)

    def watch(self) -> None:
        """The watch delivers the server's current objects (and forgets deleted ones)."""
        for obj in list(self.api.objects.values()):
            self.cache.put(copy.deepcopy(obj))
        for kind in ("Namespace", "ResourceQuota", "RoleBinding", "Tenant"):
            for ns, name in self.cache.keys(kind):
                if self.api.find(kind, ns, name) is None:
                    self.cache.remove(kind, ns, name)

    def update_spec(self, **change: Any) -> None:
        obj = self.api.objects[("Tenant", "", NAME)]
        obj["spec"].update(change)
        obj["metadata"]["generation"] += 1
        obj["metadata"]["resourceVersion"] = self.api.next_rv()
        self.cache.put(copy.deepcopy(obj))

    def delete(self, *, at: dt.datetime | None = None) -> None:
        """`kubectl delete tenant`: the server sets deletionTimestamp (finalizers hold it)."""
        obj = self.api.objects[("Tenant", "", NAME)]
        when = at or dt.datetime.now(dt.UTC)
        obj["metadata"]["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        obj["metadata"]["resourceVersion"] = self.api.next_rv()
        self.cache.put(copy.deepcopy(obj))

    async def run(self) -> None:
        self.api.reset()
        await self.reconciler.reconcile(("", NAME))

    def tenant(self) -> Obj:
        obj = self.cache.get("Tenant", None, NAME)
        assert obj is not None
        return obj

    def condition(self, type_: str) -> Obj:
        found = [c for c in self.tenant()["status"]["conditions"] if c["type"] == type_]
        assert len(found) == 1, (type_, self.tenant().get("status"))
        cond: Obj = found[0]
        return cond

    def reason(self, type_: str) -> tuple[str, str]:
        cond = self.condition(type_)
        return cond["status"], cond["reason"]

    def applied(self, namespace: str | None = None) -> list[str]:
        return [
            o["kind"]
            for o in self.api.applied
            if namespace is None
            or o["metadata"].get("namespace", o["metadata"]["name"]) == namespace
        ]

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.api.events]

    def created_namespaces(self) -> list[str]:
        return [o["metadata"]["name"] for o in self.api.created if o["kind"] == "Namespace"]


def namespace_of(tenant: str, name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"bmad.dev/tenant": tenant}},
    }


def stripe_integration(h: Harness, *, key: str | None = "sk_test_acme") -> None:
    h.seed(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "stripe", "namespace": SYSTEM_NS, "uid": "uid-stripe"},
            "spec": {
                "type": "stripe",
                "secretRef": {"name": "stripe-creds"},
                "stripe": {"apiBase": "http://127.0.0.1:12111"},
            },
        }
    )
    if key is not None:
        h.seed(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "stripe-creds", "namespace": SYSTEM_NS},
                "data": {"apiKey": base64.b64encode(key.encode()).decode()},
            }
        )


BILLING = {"integration": "stripe", "priceId": "price_basic", "email": "ops@acme.test"}


# --- the first pass and an unchanged one ----------------------------------------------------


async def test_first_pass_adds_the_finalizer_sets_up_namespaces_and_writes_status_once() -> None:
    h = Harness({"namespaces": ["acme-prod", "acme-dev"], "quota": {"cpu": "8"}})
    await h.run()
    (finalizer_patch,) = h.api.patches
    assert finalizer_patch[2]["metadata"]["finalizers"] == [tenant_reconciler.FINALIZER]
    # Each namespace is created, labelled for the tenant, in one call (a claim only one
    # Tenant can win), and marked as made for it.
    assert h.created_namespaces() == ["acme-prod", "acme-dev"]
    for ns in ("acme-prod", "acme-dev"):
        assert h.applied(ns) == ["ResourceQuota", *FENCES]
        ns_meta = h.api.objects[("Namespace", "", ns)]["metadata"]
        assert ns_meta["labels"]["bmad.dev/tenant"] == NAME
        assert ns_meta["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert ns_meta["annotations"] == {"bmad.dev/created-for-tenant": NAME}
    assert len(h.api.verbs("patch_status")) == 1
    status = h.api.statuses[0]
    assert status["namespaces"] == ["acme-prod", "acme-dev"]
    assert status["usage"] == {"agents": 0, "replicas": 0, "tokensThisPeriod": 0}
    assert [c["type"] for c in status["conditions"]] == [
        "Ready",
        "QuotaReady",
        "BillingReady",
        "Suspended",
    ]
    assert h.reason("Ready") == ("True", "TenantReady")
    assert "2 namespaces ready; 0 agents" in h.condition("Ready")["message"]
    assert h.reason("QuotaReady") == ("True", "QuotaApplied")
    assert h.reason("BillingReady") == ("True", "NoBilling")
    assert h.reason("Suspended") == ("False", "Active")
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    # A condition that appears True is announced with its reason.
    assert h.event_reasons() == ["TenantReady", "NoBilling"]
    assert {e["type"] for e in h.api.events} == {"Normal"}


async def test_a_second_identical_pass_writes_nothing() -> None:
    h = Harness({"namespaces": ["acme-prod"], "admins": [{"kind": "User", "name": "alice"}]})
    await h.run()
    h.watch()
    await h.run()
    assert h.api.calls == []


async def test_a_second_identical_pass_with_a_quota_makes_no_calls() -> None:
    h = Harness({"namespaces": ["acme-prod"], "quota": {"pods": "10"}})
    await h.run()
    h.watch()
    await h.run()
    assert h.api.calls == []


async def test_agents_in_its_namespaces_are_counted_in_usage() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    h.seed(namespace_of(NAME, "acme-prod"))
    for name, replicas in (("mary", 2), ("john", 3)):
        h.seed(
            {
                "kind": "Agent",
                "metadata": {"name": name, "namespace": "acme-prod"},
                "spec": {"replicas": replicas},
            }
        )
    h.seed({"kind": "Agent", "metadata": {"name": "else", "namespace": "other"}, "spec": {}})
    await h.run()
    assert h.tenant()["status"]["usage"] == {"agents": 2, "replicas": 5, "tokensThisPeriod": 0}
    assert "2 agents" in h.condition("Ready")["message"]


# --- conflicts, suspension, invalid spec ------------------------------------------------------


async def test_a_namespace_of_another_tenant_is_left_alone_and_reported() -> None:
    h = Harness({"namespaces": ["shared", "acme-prod"]})
    h.seed(namespace_of("globex", "shared"))
    await h.run()
    assert h.applied("shared") == []
    assert h.created_namespaces() == ["acme-prod"]
    assert h.api.objects[("Namespace", "", "shared")]["metadata"]["labels"] == {
        "bmad.dev/tenant": "globex"
    }
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NamespaceConflict")
    assert "shared (tenant globex)" in ready["message"]
    (warning,) = [e for e in h.api.events if e["type"] == "Warning"]
    assert warning["reason"] == "NamespaceConflict"


async def test_suspension_is_a_condition_and_flips_ready_with_events() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    await h.run()
    h.watch()
    h.update_spec(suspended=True)
    await h.run()
    assert h.reason("Suspended") == ("True", "SuspendedBySpec")
    assert h.reason("Ready") == ("False", "Suspended")
    assert h.event_reasons() == ["Suspended"]
    assert h.api.events[0]["type"] == "Warning"
    h.watch()
    h.update_spec(suspended=False)
    await h.run()
    assert h.reason("Ready") == ("True", "TenantReady")
    assert h.event_reasons() == ["TenantReady"]


async def test_invalid_spec_is_a_condition_and_touches_nothing() -> None:
    h = Harness({"namespaces": ["Not_A_Label"]})
    await h.run()
    assert h.api.applied == []
    assert h.api.patches == []
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.namespaces" in ready["message"]


# --- what left the spec -----------------------------------------------------------------------


async def test_a_removed_quota_and_removed_admins_are_pruned() -> None:
    h = Harness(
        {
            "namespaces": ["acme-prod"],
            "quota": {"cpu": "8"},
            "admins": [{"kind": "User", "name": "alice"}],
        }
    )
    await h.run()
    h.watch()
    h.update_spec(quota=None, admins=None)
    await h.run()
    assert ("ResourceQuota", "acme-prod", "bmad-tenant-quota") in h.api.deleted
    assert ("RoleBinding", "acme-prod", "bmad-tenant-admins") in h.api.deleted
    assert h.reason("QuotaReady") == ("True", "NoQuota")


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
async def test_a_namespace_that_left_the_spec_follows_the_deletion_policy(policy: str) -> None:
    h = Harness({"namespaces": ["acme-prod", "acme-dev"], "deletionPolicy": policy})
    await h.run()
    h.watch()
    h.update_spec(namespaces=["acme-prod"])
    await h.run()
    if policy == "Retain":
        ns = h.api.find("Namespace", None, "acme-dev")
        assert ns is not None
        assert "bmad.dev/tenant" not in ns["metadata"]["labels"]
        assert ("RoleBinding", "acme-dev", "bmad-tenant-admins") in h.api.deleted
    else:
        assert h.api.find("Namespace", None, "acme-dev") is None
    assert h.api.find("Namespace", None, "acme-prod") is not None
    assert h.tenant()["status"]["namespaces"] == ["acme-prod"]
    (released,) = [e for e in h.api.events if e["reason"] == "NamespacesReleased"]
    assert "acme-dev" in released["message"]


# --- billing ----------------------------------------------------------------------------------


async def test_billing_creates_the_customer_once_and_keeps_its_id_at_once(
    stripe: FakeStripe,
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "billing": BILLING})
    stripe_integration(h)
    await h.run()
    (customer,) = stripe.customers
    assert customer["account"].api_key == "sk_test_acme"
    assert customer["tenant_uid"] == "uid-tenant-acme"
    assert customer["email"] == "ops@acme.test"
    # The customer id is written before the subscription is asked for.
    assert h.api.statuses[0] == {"billing": {"customerId": "cus_acme"}}
    assert h.tenant()["status"]["billing"] == {
        "customerId": "cus_acme",
        "subscriptionId": "sub_acme",
    }
    assert h.reason("BillingReady") == ("True", "Subscribed")
    assert h.reason("Ready") == ("True", "TenantReady")
    h.watch()
    await h.run()
    assert len(stripe.customers) == 1
    assert len(stripe.subscriptions) == 1


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("no-integration", "IntegrationNotFound"),
        ("invalid-integration", "InvalidConfiguration"),
        ("no-secret", "SecretNotFound"),
        ("no-key", "SecretKeyMissing"),
        ("stripe-refuses", "AuthenticationFailed"),
    ],
)
async def test_billing_problems_are_conditions_with_their_reason(
    stripe: FakeStripe, setup: str, reason: str
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "billing": BILLING})
    if setup == "invalid-integration":
        stripe_integration(h)
        del h.api.objects[("Integration", SYSTEM_NS, "stripe")]["spec"]["stripe"]
        h.cache.put(h.api.objects[("Integration", SYSTEM_NS, "stripe")])
    elif setup == "no-secret":
        stripe_integration(h, key=None)
    elif setup == "no-key":
        stripe_integration(h)
        h.api.objects[("Secret", SYSTEM_NS, "stripe-creds")]["data"] = {}
    elif setup == "stripe-refuses":
        stripe_integration(h)
        stripe.fail = billing.BillingError("AuthenticationFailed", "Stripe refused the API key")
    await h.run()
    assert h.reason("BillingReady") == ("False", reason)
    # Ready carries billing's reason; the namespaces are set up regardless.
    assert h.reason("Ready") == ("False", reason)
    assert h.created_namespaces() == ["acme-prod"]
    assert "sk_test_acme" not in str(h.api.statuses) + str(h.api.events)


# --- deletion ---------------------------------------------------------------------------------


async def test_deletion_with_retain_releases_namespaces_then_the_finalizer() -> None:
    h = Harness({"namespaces": ["acme-prod"], "deletionPolicy": "Retain"})
    await h.run()
    h.watch()
    h.delete()
    await h.run()
    ns = h.api.find("Namespace", None, "acme-prod")
    assert ns is not None
    assert "bmad.dev/tenant" not in ns["metadata"]["labels"]
    assert h.api.find("Tenant", None, NAME) is None  # the finalizer went: the tenant is gone


async def test_deletion_with_delete_cancels_the_subscription_once(stripe: FakeStripe) -> None:
    h = Harness({"namespaces": ["acme-prod"], "deletionPolicy": "Delete", "billing": BILLING})
    stripe_integration(h)
    await h.run()
    h.watch()
    h.delete()
    await h.run()
    assert h.api.find("Namespace", None, "acme-prod") is None
    assert stripe.cancelled == ["sub_acme"]
    assert h.api.find("Tenant", None, NAME) is None


async def test_a_failed_deletion_is_retried_with_a_condition_then_abandoned() -> None:
    h = Harness({"namespaces": ["acme-prod"], "deletionPolicy": "Delete"})
    await h.run()
    h.watch()
    h.api.refuse_delete["Namespace"] = errors.ApiError(403, "Forbidden", "namespaces forbidden")
    h.delete()
    with pytest.raises(errors.Requeue) as again:
        await h.run()
    assert again.value.delay == 15.0
    assert h.reason("Ready") == ("False", "DeletionFailed")
    assert "namespaces forbidden" in h.condition("Ready")["message"]
    assert h.event_reasons() == ["DeletionFailed"]
    assert h.api.find("Tenant", None, NAME) is not None
    # After the deadline the finalizer goes anyway: a deletion never hangs forever.
    h.delete(at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=11))
    await h.run()
    assert h.event_reasons() == ["DeletionAbandoned"]
    assert h.api.find("Tenant", None, NAME) is None


async def test_an_invalid_spec_while_deleting_releases_the_finalizer() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    await h.run()
    h.watch()
    h.api.objects[("Tenant", "", NAME)]["spec"]["namespaces"] = ["Not_A_Label"]
    h.delete()
    await h.run()
    assert h.event_reasons() == ["DeletionAbandoned"]
    assert h.api.find("Tenant", None, NAME) is None
    assert h.api.deleted == []


async def test_a_tenant_deleted_meanwhile_is_not_an_error() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    del h.api.objects[("Tenant", "", NAME)]  # gone on the server, still in the store
    await h.run()
    assert h.api.applied == []
    assert h.cache.get("Tenant", None, NAME) is None


# --- issue 10, hole 8: a Tenant takes only namespaces made for it -----------------------------


def bare_namespace(name: str, labels: dict[str, str] | None = None) -> Obj:
    """A namespace someone else made (the watch delivers every namespace)."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "uid": f"uid-ns-{name}", "labels": dict(labels or {})},
    }


@pytest.mark.parametrize(
    ("namespace", "labels"),
    [
        ("kube-system", {}),
        ("kube-public", {}),
        ("kube-node-lease", {}),
        # the operator's own: refused even with an adoption label
        (SYSTEM_NS, {"bmad.dev/adopt-by-tenant": NAME}),
    ],
)
async def test_namespace_takeover_a_system_namespace_is_refused_and_left_unlabelled(
    namespace: str, labels: dict[str, str]
) -> None:
    """Hole 8: a Tenant naming kube-system (or the operator's namespace) labelled it, put
    its fences in it, and with deletionPolicy Delete deleted it on release.

    On the code before the fix:
        assert h.applied(namespace) == []
        AssertionError: assert ['Namespace', 'LimitRange', 'NetworkPolicy', ...] == []
    """
    h = Harness({"namespaces": [namespace, "acme-prod"], "deletionPolicy": "Delete"})
    before = bare_namespace(namespace, labels)
    h.seed(before)
    await h.run()
    assert h.applied(namespace) == []
    assert h.api.find("Namespace", None, namespace)["metadata"]["labels"] == labels
    assert h.applied("acme-prod")  # the others are set up regardless
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NamespaceProtected")
    assert f"Namespace {namespace} " in ready["message"]
    assert "remove it from spec.namespaces" in ready["message"]
    assert h.tenant()["status"]["namespaces"] == ["acme-prod"]
    # Deleting the Tenant never deletes it.
    h.watch()
    h.delete()
    await h.run()
    assert h.api.find("Namespace", None, namespace) is not None
    assert ("Namespace", "", namespace) not in h.api.deleted


async def test_namespace_takeover_an_existing_namespace_needs_an_admins_adoption_label() -> None:
    """Hole 8: an existing unlabelled namespace (a monitoring namespace, another team's)
    was taken over silently.

    On the code before the fix:
        assert h.applied("monitoring") == []
        AssertionError: assert ['Namespace', 'LimitRange', 'NetworkPolicy', ...] == []
    """
    h = Harness({"namespaces": ["monitoring"], "deletionPolicy": "Delete"})
    h.seed(bare_namespace("monitoring", {"team": "sre"}))
    await h.run()
    assert h.applied("monitoring") == []
    assert h.api.find("Namespace", None, "monitoring")["metadata"]["labels"] == {"team": "sre"}
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NamespaceExists")
    assert "kubectl label namespace monitoring bmad.dev/adopt-by-tenant=acme" in ready["message"]
    assert h.tenant()["status"]["namespaces"] == []

    # A cluster admin hands it over: the tenant adopts it, in one conditional write.
    h.seed(bare_namespace("monitoring", {"team": "sre", "bmad.dev/adopt-by-tenant": NAME}))
    rv = h.api.find("Namespace", None, "monitoring")["metadata"]["resourceVersion"]
    await h.run()
    (adoption,) = [p for p in h.api.patches if p[0] == "Namespace"]
    assert adoption[2]["metadata"]["resourceVersion"] == rv
    labels = h.api.find("Namespace", None, "monitoring")["metadata"]["labels"]
    assert labels["bmad.dev/tenant"] == NAME
    assert labels["team"] == "sre"
    assert "bmad.dev/adopt-by-tenant" not in labels  # used up
    assert h.applied("monitoring")[-len(FENCES) :] == FENCES
    assert h.reason("Ready") == ("True", "TenantReady")

    # Adopted, not created for the tenant: deleting the Tenant releases it, never deletes it.
    h.watch()
    h.delete()
    await h.run()
    ns = h.api.find("Namespace", None, "monitoring")
    assert ns is not None
    assert "bmad.dev/tenant" not in ns["metadata"]["labels"]


async def test_namespace_takeover_an_adoption_label_for_another_tenant_adopts_nothing() -> None:
    h = Harness({"namespaces": ["legacy"]})
    h.seed(bare_namespace("legacy", {"bmad.dev/adopt-by-tenant": "globex"}))
    await h.run()
    assert h.api.patches[1:] == []  # only the finalizer
    assert h.applied("legacy") == []
    ready = h.condition("Ready")
    assert ready["reason"] == "NamespaceExists"
    assert "globex" in ready["message"]


class RacingKube(FakeKube):
    """Reads answer what was there when asked, then let the other reconcile run: two
    Tenants both see a namespace missing before either creates it."""

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        found = await super().get(kind, namespace, name)
        await asyncio.sleep(0)
        return found


async def test_namespace_takeover_two_tenants_racing_for_a_new_namespace_one_wins() -> None:
    """Hole 8: two Tenants naming one new namespace both "claimed" it; the label (and the
    admin RoleBinding) went to whoever wrote last.

    On the code before the fix both reported themselves ready over one namespace:
        AssertionError: {'acme': 'TenantReady', 'globex': 'TenantReady'}
        assert ['acme', 'globex'] == ['globex']
    """
    api = RacingKube()
    tenants = {}
    for tenant in ("acme", "globex"):
        cache = store.Store()
        api.seed(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Tenant",
                "metadata": {"name": tenant, "uid": f"uid-{tenant}", "generation": 1},
                "spec": {
                    "namespaces": ["shared"],
                    "admins": [{"kind": "User", "name": f"admin-{tenant}"}],
                },
            },
            cache,
        )
        rec = tenant_reconciler.TenantReconciler(
            api=api,  # type: ignore[arg-type]
            cache=cache,
            operator_namespace=SYSTEM_NS,
        )
        tenants[tenant] = (rec, cache)
    await asyncio.gather(*(rec.reconcile(("", t)) for t, (rec, _) in tenants.items()))
    holder = api.find("Namespace", None, "shared")["metadata"]["labels"]["bmad.dev/tenant"]
    outcomes = {}
    for tenant, (_, cache) in tenants.items():
        ready = next(
            c
            for c in cache.get("Tenant", None, tenant)["status"]["conditions"]
            if c["type"] == "Ready"
        )
        outcomes[tenant] = ready["reason"]
    winners = [t for t, reason in outcomes.items() if reason == "TenantReady"]
    assert winners == [holder], outcomes
    (loser,) = set(tenants) - {holder}
    assert outcomes[loser] == "NamespaceConflict"
    binding = api.find("RoleBinding", "shared", "bmad-tenant-admins")
    assert [s["name"] for s in binding["subjects"]] == [f"admin-{holder}"]


async def test_a_removed_tenant_label_on_a_namespace_made_for_it_is_put_back() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    await h.run()
    h.watch()
    ns = h.api.objects[("Namespace", "", "acme-prod")]
    del ns["metadata"]["labels"]["bmad.dev/tenant"]
    ns["metadata"]["resourceVersion"] = h.api.next_rv()
    h.watch()
    await h.run()
    labels = h.api.objects[("Namespace", "", "acme-prod")]["metadata"]["labels"]
    assert labels["bmad.dev/tenant"] == NAME
    assert h.reason("Ready") == ("True", "TenantReady")


# --- issue 10, hole 5: the Agent budget is also a ResourceQuota -------------------------------


async def test_the_agent_budget_is_an_object_count_quota_in_every_namespace() -> None:
    h = Harness({"namespaces": ["acme-prod", "acme-dev"], "limits": {"agents": 5}})
    await h.run()
    for ns in ("acme-prod", "acme-dev"):
        quota = h.api.find("ResourceQuota", ns, "bmad-tenant-agents")
        assert quota["spec"]["hard"] == {"count/agents.bmad.dev": "5"}
        assert quota["metadata"]["labels"]["bmad.dev/tenant"] == NAME
    h.watch()
    h.update_spec(limits={"replicas": 3})  # no Agent budget any more: the quota goes
    await h.run()
    assert ("ResourceQuota", "acme-prod", "bmad-tenant-agents") in h.api.deleted
    assert ("ResourceQuota", "acme-dev", "bmad-tenant-agents") in h.api.deleted


async def test_ready_waits_until_kubernetes_has_counted_the_quotas() -> None:
    """Until the quota controller has counted a new ResourceQuota, the API server refuses
    every create it covers ("status unknown for quota"): the Tenant is not ready yet."""
    h = Harness({"namespaces": ["acme-prod"], "limits": {"agents": 5}})
    await h.run()
    h.watch()
    quota = h.api.objects[("ResourceQuota", "acme-prod", "bmad-tenant-agents")]
    counted = quota.pop("status")
    h.watch()
    await h.run()
    assert h.reason("QuotaReady") == ("False", "QuotaPending")
    assert "acme-prod/bmad-tenant-agents" in h.condition("QuotaReady")["message"]
    assert h.reason("Ready") == ("False", "QuotaPending")
    quota["status"] = counted  # the watch delivers the counted quota
    h.watch()
    await h.run()
    assert h.reason("Ready") == ("True", "TenantReady")


# --- the usage ledger (issue 14) -------------------------------------------------------


class FakeUsage:
    """The metering loop as the reconciler sees it (`common.UsageSource`)."""

    agent_url = "redis://ledger:6379/0"
    spool = True

    def __init__(self) -> None:
        self.loaded = True
        self.usage: usage_store.PeriodUsage | None = None
        self.budget: usage_budget.State | None = None
        self.payment: stripe_webhooks.PaymentState | None = None
        self.targets: dict[str, usage_reporter.Target | None] = {}

    def usage_of_agent(self, namespace: str, name: str) -> usage_store.PeriodUsage | None:
        return self.usage

    def usage_of_tenant(self, tenant: str) -> usage_store.PeriodUsage | None:
        return self.usage

    def budget_of(self, tenant: str) -> usage_budget.State | None:
        return self.budget

    def payment_of(self, customer_id: str) -> stripe_webhooks.PaymentState | None:
        return self.payment

    async def ensure_writer(self, **kw: str) -> None:
        raise AssertionError("the Tenant reconciler sets no writer")

    def bill_to(self, tenant: str, target: usage_reporter.Target | None) -> None:
        self.targets[tenant] = target


async def test_usage_and_budget_of_a_tenant_and_where_its_usage_is_reported() -> None:
    h = Harness({"namespaces": ["acme-prod"], "limits": {"tokensPerMonth": 1000}})
    usage = FakeUsage()
    h.reconciler.usage = usage
    now = dt.datetime.now(dt.UTC)
    usage.usage = usage_store.PeriodUsage(
        period_start=usage_periods.containing(now).start,
        this_period=usage_store.Totals(records=3, tokens_in=800, tokens_out=300),
        last_period=usage_store.Totals(records=1, tokens_in=5, tokens_out=5),
    )
    usage.budget = usage_budget.decide(limit=1000, used=1100, now=now)
    await h.run()
    shown = h.tenant()["status"]["usage"]
    assert shown["tokensThisPeriod"] == 1100
    assert shown["thisPeriod"] == {"calls": 3, "tokensIn": 800, "tokensOut": 300}
    assert shown["lastPeriod"] == {"calls": 1, "tokensIn": 5, "tokensOut": 5}
    assert h.reason("BudgetExhausted") == ("True", "TokensPerMonthReached")
    assert "BudgetExhausted" in h.event_reasons()
    # Without spec.billing its usage is metered, not billed.
    target = usage.targets[NAME]
    assert target is not None
    assert target.customer_id is None


async def test_a_billed_tenant_is_reported_to_its_customer_once_billing_is_in_place(
    stripe: FakeStripe,
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "billing": BILLING})
    usage = FakeUsage()
    h.reconciler.usage = usage
    await h.run()  # no stripe Integration yet: the usage waits
    assert NAME in usage.targets
    assert usage.targets[NAME] is None
    stripe_integration(h)
    await h.run()
    target = usage.targets[NAME]
    assert target is not None
    assert target.customer_id == "cus_acme"
    assert target.account is not None
    assert target.account.api_key == "sk_test_acme"


async def test_a_payment_suspension_lives_in_status_survives_a_takeover_and_lifts_when_paid(
    stripe: FakeStripe,
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "billing": BILLING})
    usage = FakeUsage()
    h.reconciler.usage = usage
    stripe_integration(h)
    await h.run()
    assert h.reason("PaymentFailed") == ("False", "PaymentsCurrent")
    assert h.reason("Suspended") == ("False", "Active")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    usage.payment = stripe_webhooks.PaymentState(
        "cus_acme", failed_since=long_ago, last_failure_at=long_ago
    )
    await h.run()
    assert h.reason("PaymentFailed") == ("True", "PaymentOverdue")
    assert h.reason("Suspended") == ("True", "PaymentOverdue")
    assert h.reason("Ready") == ("False", "PaymentOverdue")
    assert h.tenant()["spec"].get("suspended") is None  # the spec is never written
    assert "PaymentOverdue" in h.event_reasons()
    # A replica that took over and has not read the payment states keeps it.
    usage.loaded, usage.payment = False, None
    await h.run()
    assert h.reason("Suspended") == ("True", "PaymentOverdue")
    usage.loaded = True
    await h.run()
    assert h.reason("PaymentFailed") == ("False", "PaymentsCurrent")
    assert h.reason("Suspended") == ("False", "Active")
    assert "PaymentResumed" in h.event_reasons()


# --- the soft budget warning (issue 14, item 4) -----------------------------------------------


def budget_state(used: int, *, limit: int = 1000, at: dt.datetime | None = None) -> Any:
    return usage_budget.decide(limit=limit, used=used, now=at or dt.datetime.now(dt.UTC))


def mail_binding(h: Harness, namespace: str = SYSTEM_NS, *, kind: str = "email") -> None:
    data = {"type": kind, "provider": "smtp", "host": "smtp.test", "from": "bmad@example.com"}
    h.seed(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mail-binding", "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
    )


@pytest.fixture
def mails(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    sent: list[Any] = []

    async def send(data: Any, mail: Any, **kw: Any) -> None:
        sent.append((dict(data), mail))

    monkeypatch.setattr(tenant_reconciler.email_mod, "send", send)
    return sent


NOTIFY = {"integration": "mail", "recipients": ["ops@example.com"]}


async def test_the_budget_warning_is_given_once_a_month_with_its_mail(mails: list[Any]) -> None:
    h = Harness({"namespaces": ["acme-prod"], "limits": {"tokensPerMonth": 1000}, "notify": NOTIFY})
    mail_binding(h)
    usage = FakeUsage()
    h.reconciler.usage = usage
    usage.budget = budget_state(799)
    await h.run()
    assert h.reason("BudgetWarning") == ("False", "BelowWarningLevel")
    assert "warnedForPeriod" not in h.tenant()["status"]["usage"]
    assert mails == []

    usage.budget = budget_state(800)  # the default level: 80%
    await h.run()
    assert h.reason("BudgetWarning") == ("True", "TokensPerMonthNearlyUsed")
    period = usage.budget.period_start.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert h.tenant()["status"]["usage"]["warnedForPeriod"] == period
    assert h.event_reasons() == ["BudgetWarning"]
    assert len(mails) == 1
    data, mail = mails[0]
    assert data["host"] == "smtp.test"
    assert mail.recipients == ("ops@example.com",)
    assert mail.sender == "bmad@example.com"
    assert "800 of the tenant's 1000 tokens" in mail.body
    first_id = mail.message_id

    # More usage, and exhausted, in the same month: no second warning.
    for used in (900, 1200):
        usage.budget = budget_state(used)
        await h.run()
        assert h.reason("BudgetWarning")[0] == "True"
        assert "BudgetWarning" not in h.event_reasons()
    assert len(mails) == 1

    # The limit raised: below the level again; back over it in the same month: still once.
    usage.budget = budget_state(1200, limit=10_000)
    await h.run()
    assert h.reason("BudgetWarning") == ("False", "BelowWarningLevel")
    assert h.tenant()["status"]["usage"]["warnedForPeriod"] == period
    usage.budget = budget_state(9000, limit=10_000)
    await h.run()
    assert "BudgetWarning" not in h.event_reasons()
    assert len(mails) == 1

    # The next month: warned again, with another Message-ID.
    next_month = usage_periods.containing(dt.datetime.now(dt.UTC)).end + dt.timedelta(hours=1)
    usage.budget = budget_state(850, at=next_month)
    await h.run()
    assert h.event_reasons() == ["BudgetWarning"]
    assert len(mails) == 2
    assert mails[1][1].message_id != first_id
    assert h.tenant()["status"]["usage"]["warnedForPeriod"] == usage.budget.period_start.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


async def test_the_budget_warning_level_is_the_tenants_percentage() -> None:
    h = Harness(
        {"namespaces": ["acme-prod"], "limits": {"tokensPerMonth": 1000, "warnAtPercent": 50}}
    )
    usage = FakeUsage()
    h.reconciler.usage = usage
    usage.budget = budget_state(499)
    await h.run()
    assert h.reason("BudgetWarning") == ("False", "BelowWarningLevel")
    assert "at 500 (50%" in h.condition("BudgetWarning")["message"]
    usage.budget = budget_state(500)
    await h.run()
    assert h.reason("BudgetWarning") == ("True", "TokensPerMonthNearlyUsed")
    # Without spec.notify: the Event only.
    assert h.event_reasons() == ["BudgetWarning"]


async def test_a_budget_warning_mail_that_cannot_be_sent_is_an_event(mails: list[Any]) -> None:
    h = Harness({"namespaces": ["acme-prod"], "limits": {"tokensPerMonth": 1000}, "notify": NOTIFY})
    usage = FakeUsage()
    h.reconciler.usage = usage
    usage.budget = budget_state(0)
    await h.run()
    usage.budget = budget_state(900)
    await h.run()  # no binding Secret: the Integration is missing or not ready
    assert h.event_reasons() == ["BudgetWarning", "NotificationFailed"]
    failed = next(e for e in h.api.events if e["reason"] == "NotificationFailed")
    assert "spec.notify.integration" in failed["message"]
    assert mails == []
    assert h.reason("BudgetWarning")[0] == "True"


async def test_no_token_budget_no_warning_and_a_takeover_keeps_what_is_shown() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    usage = FakeUsage()
    h.reconciler.usage = usage
    await h.run()
    assert h.reason("BudgetWarning") == ("False", "NoTokenBudget")
    h.update_spec(limits={"tokensPerMonth": 100})
    usage.budget = budget_state(90, limit=100)
    await h.run()
    assert h.reason("BudgetWarning")[0] == "True"
    warned = h.tenant()["status"]["usage"]["warnedForPeriod"]
    usage.loaded, usage.budget = False, None  # a replica that took over, ledger not read
    await h.run()
    assert h.reason("BudgetWarning")[0] == "True"
    assert h.tenant()["status"]["usage"]["warnedForPeriod"] == warned
    assert h.event_reasons() == []


# --- issue 14: a stale PaymentFailed once spec.billing is removed -----------------------------


async def test_removing_billing_clears_payment_failed_and_lifts_a_payment_suspension(
    stripe: FakeStripe,
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "billing": BILLING})
    usage = FakeUsage()
    h.reconciler.usage = usage
    stripe_integration(h)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    usage.payment = stripe_webhooks.PaymentState(
        "cus_acme", failed_since=long_ago, last_failure_at=long_ago
    )
    await h.run()
    assert h.reason("PaymentFailed") == ("True", "PaymentOverdue")
    assert h.reason("Suspended") == ("True", "PaymentOverdue")

    h.update_spec(billing=None)
    await h.run()
    assert h.reason("PaymentFailed") == ("False", "BillingRemoved")
    assert h.reason("Suspended") == ("False", "Active")
    assert h.reason("BillingReady") == ("True", "NoBilling")
    told = {e["reason"]: e["message"] for e in h.api.events}
    assert "BillingRemoved" in told
    assert told["PaymentResumed"].startswith("The tenant's spec.billing was removed")
    # The next pass: nothing left to change, nothing said.
    await h.run()
    assert h.api.statuses == []
    assert h.event_reasons() == []


async def test_removing_billing_during_a_takeover_lifts_the_shown_payment_suspension(
    stripe: FakeStripe,
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "billing": BILLING})
    usage = FakeUsage()
    h.reconciler.usage = usage
    stripe_integration(h)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    usage.payment = stripe_webhooks.PaymentState(
        "cus_acme", failed_since=long_ago, last_failure_at=long_ago
    )
    await h.run()
    assert h.reason("Suspended") == ("True", "PaymentOverdue")
    usage.loaded, usage.payment = False, None  # a replica that took over, not read yet
    h.update_spec(billing=None)
    await h.run()
    assert h.reason("Suspended") == ("False", "Active")
    assert h.reason("PaymentFailed") == ("False", "BillingRemoved")


async def test_a_tenant_never_billed_gets_no_payment_failed() -> None:
    h = Harness({"namespaces": ["acme-prod"]})
    h.reconciler.usage = FakeUsage()
    await h.run()
    assert [c for c in h.tenant()["status"]["conditions"] if c["type"] == "PaymentFailed"] == []


async def test_a_binding_secret_that_cannot_be_read_is_an_event_not_a_failed_pass(
    mails: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness({"namespaces": ["acme-prod"], "limits": {"tokensPerMonth": 1000}, "notify": NOTIFY})
    read = h.api.get

    async def get(kind: str, namespace: str | None, name: str) -> Obj | None:
        if kind == "Secret":
            raise errors.ApiError(403, "Forbidden", "secrets is forbidden")
        return await read(kind, namespace, name)

    monkeypatch.setattr(h.api, "get", get)
    usage = FakeUsage()
    h.reconciler.usage = usage
    usage.budget = budget_state(0)
    await h.run()
    usage.budget = budget_state(900)
    await h.run()
    assert h.event_reasons() == ["BudgetWarning", "NotificationFailed"]
    failed = next(e for e in h.api.events if e["reason"] == "NotificationFailed")
    assert "could not be read: secrets is forbidden" in failed["message"]
    assert mails == []
    assert h.reason("BudgetWarning")[0] == "True"
