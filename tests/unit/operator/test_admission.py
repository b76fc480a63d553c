"""The budget webhook's pure parts: the budget decision and the configuration."""

from __future__ import annotations

import base64

import pytest

from bmad_operator import admission, store

pytestmark = pytest.mark.unit


def _cache(limits: dict[str, int], agents: dict[tuple[str, str], int]) -> store.Store:
    cache = store.Store()
    cache.put(
        {
            "kind": "Tenant",
            "metadata": {"name": "acme", "uid": "t"},
            "spec": {"namespaces": ["a", "b"], "limits": limits},
        }
    )
    for ns in ("a", "b"):
        cache.put(
            {"kind": "Namespace", "metadata": {"name": ns, "labels": {"bmad.dev/tenant": "acme"}}}
        )
    cache.put({"kind": "Namespace", "metadata": {"name": "elsewhere"}})
    for (ns, name), replicas in agents.items():
        cache.put(
            {
                "kind": "Agent",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": replicas},
            }
        )
    return cache


def test_a_third_agent_over_a_budget_of_two_is_refused_naming_the_budget() -> None:
    cache = _cache({"agents": 2}, {("a", "one"): 1, ("b", "two"): 1})
    problem = admission.budget_violation(cache, namespace="a", name="three", spec={"replicas": 1})
    assert problem is not None
    assert "spec.limits.agents" in problem
    assert "acme" in problem


def test_updating_an_existing_agent_does_not_count_it_twice() -> None:
    cache = _cache({"agents": 2}, {("a", "one"): 1, ("b", "two"): 1})
    assert (
        admission.budget_violation(cache, namespace="a", name="one", spec={"replicas": 1}) is None
    )


def test_replica_budget_counts_all_namespaces_of_the_tenant() -> None:
    cache = _cache({"replicas": 4}, {("a", "one"): 2, ("b", "two"): 1})
    assert (
        admission.budget_violation(cache, namespace="a", name="three", spec={"replicas": 1}) is None
    )
    problem = admission.budget_violation(cache, namespace="a", name="three", spec={"replicas": 2})
    assert problem is not None
    assert "spec.limits.replicas" in problem


def test_namespaces_outside_a_tenant_are_not_budgeted() -> None:
    cache = _cache({"agents": 0}, {})
    assert (
        admission.budget_violation(cache, namespace="elsewhere", name="x", spec={"replicas": 9})
        is None
    )


def test_configuration_selects_tenant_namespaces_and_pins_the_ca(tmp_path: object) -> None:
    cert = admission.self_signed("127.0.0.1")
    config = admission.webhook_configuration("https://127.0.0.1:9443", cert.pem)
    hook, scale_hook, approvers_hook = config["webhooks"]
    assert approvers_hook["rules"][0]["resources"] == ["workflows"]
    assert approvers_hook["clientConfig"]["url"] == "https://127.0.0.1:9443/workflow-approvers"
    assert "namespaceSelector" not in approvers_hook  # Workflows in any namespace...
    [condition] = approvers_hook["matchConditions"]  # ...that name approvers
    assert "approvers" in condition["expression"]
    assert scale_hook["rules"][0]["resources"] == ["agents/scale"]
    assert scale_hook["clientConfig"]["url"] == "https://127.0.0.1:9443/agent-budget-scale"
    assert hook["namespaceSelector"]["matchExpressions"][0]["key"] == "bmad.dev/tenant"
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == cert.pem
    assert hook["clientConfig"]["url"].endswith("/agent-budget")
    assert hook["failurePolicy"] == "Fail"
    in_cluster = admission.webhook_configuration(
        "", cert.pem, service="bmad-system/bmad-operator-webhook"
    )
    ref = in_cluster["webhooks"][0]["clientConfig"]["service"]
    assert ref == {
        "namespace": "bmad-system",
        "name": "bmad-operator-webhook",
        "path": "/agent-budget",
        "port": 443,
    }
