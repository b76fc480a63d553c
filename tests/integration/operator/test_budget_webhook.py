"""Issue 10, hole 5: the tenant budget webhook holds under concurrency, never refuses a
change that lowers usage, survives restarts and goes away with the operator.

Before the fix the webhook counted from the operator's watch cache: a burst of creates
faster than the watch passed all got in, an empty cache (right after a start) admitted
everything, an over-budget tenant could not even scale down, and with the operator down
every Agent write in a tenant namespace failed.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client import exceptions as k8s_exceptions

from bmad_operator import controller, handlers, kube, settings
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import Tenants, agent, tenant, wait_tenant

pytestmark = pytest.mark.integration

SYSTEM_NS = "bmad-system"
CONFIGURATION = "bmad-operator"


async def _api_client(kubeconfig: str) -> k8s_client.ApiClient:
    cfg = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return k8s_client.ApiClient(configuration=cfg)


async def _create_at_once(
    kubeconfig: str, namespace: str, docs: Sequence[Mapping[str, Any]]
) -> dict[str, str | None]:
    """POST every Agent at the same time; the refusal message of each, None if created."""
    async with await _api_client(kubeconfig) as api:
        custom = k8s_client.CustomObjectsApi(api)

        async def one(doc: Mapping[str, Any]) -> str | None:
            try:
                await custom.create_namespaced_custom_object(
                    "bmad.dev", "v1alpha1", namespace, "agents", dict(doc)
                )
            except k8s_exceptions.ApiException as exc:
                return str(json.loads(exc.body or "{}").get("message") or exc.reason)
            return None

        answers = await asyncio.gather(*(one(doc) for doc in docs))
    return {doc["metadata"]["name"]: answer for doc, answer in zip(docs, answers, strict=True)}


def _refused_for_budget(message: str | None, limit: str) -> bool:
    """The webhook's refusal, or the ResourceQuota's (the API server's own count)."""
    return bool(message) and (
        f"spec.limits.{limit}" in str(message)
        or "exceeded quota: bmad-tenant-agents" in str(message)
    )


def test_budget_20_agents_created_in_parallel_against_a_limit_of_5_leave_exactly_5(
    kubectl: Kubectl, kubeconfig: str, operator: OperatorProcess, tenants: Tenants
) -> None:
    """On the code before the fix every create passed (the watch had seen none of them):
    AssertionError: assert 20 == 5"""
    name = tenants.name("burst")
    ns = f"{name}-ns"
    tenants.apply(tenant(name, [ns], limits={"agents": 5}))
    wait_tenant(kubectl, name)
    answers = asyncio.run(_create_at_once(kubeconfig, ns, [agent(f"a{i:02d}") for i in range(20)]))
    stored = kubectl.in_namespace(ns).json("get", "agents")["items"]
    assert len(stored) == 5
    assert sorted(a["metadata"]["name"] for a in stored) == sorted(
        n for n, refused in answers.items() if refused is None
    )
    for refused in (m for m in answers.values() if m is not None):
        assert _refused_for_budget(refused, "agents"), refused


def test_budget_20_parallel_creates_against_a_replica_budget_of_5_sum_to_5(
    kubectl: Kubectl, kubeconfig: str, operator: OperatorProcess, tenants: Tenants
) -> None:
    """The replica sum has no ResourceQuota: the webhook's own serialised count holds it.

    Before the fix the outcome depended on how fast the watch delivered the creates (on
    one run against the code before the fix it happened to hold); it now holds by
    construction: reviews of one tenant are serialised and admitted changes remembered.
    """
    name = tenants.name("burst-r")
    ns = f"{name}-ns"
    tenants.apply(tenant(name, [ns], limits={"replicas": 5}))
    wait_tenant(kubectl, name)
    answers = asyncio.run(
        _create_at_once(kubeconfig, ns, [agent(f"r{i:02d}", replicas=1) for i in range(20)])
    )
    stored = kubectl.in_namespace(ns).json("get", "agents")["items"]
    assert sum(a["spec"]["replicas"] for a in stored) == 5
    for refused in (m for m in answers.values() if m is not None):
        assert _refused_for_budget(refused, "replicas"), refused


def test_budget_webhook_with_an_empty_cache_counts_from_the_api_server(
    kubectl: Kubectl, kubeconfig: str, operator: OperatorProcess, tenants: Tenants
) -> None:
    """The webhook's handler with a controller that has seen nothing yet (its watch cache
    empty, as right after a start) against the real API server.

    On the code before the fix it admitted everything:
        Failed: DID NOT RAISE AdmissionError
    """
    name = tenants.name("cold")
    ns = f"{name}-ns"
    tenants.apply(tenant(name, [ns], limits={"agents": 2, "replicas": 4}))
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(ns)
    k.apply(agent("one", replicas=2))
    k.apply(agent("two", replicas=2))
    live = {n: k.json("get", "agent", n) for n in ("one", "two")}

    def scale(replicas: int) -> dict[str, Any]:
        return {"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": replicas}}

    def with_replicas(obj: dict[str, Any], replicas: int) -> dict[str, Any]:
        changed = json.loads(json.dumps(obj))
        changed["spec"]["replicas"] = replicas
        return changed

    async def review() -> None:
        async with await _api_client(kubeconfig) as client:
            ctl = controller.Controller(kube.Kube(client), settings.OperatorSettings())
            assert ctl.store.count("Agent") == 0  # never started: it has seen nothing
            memo = kopf.Memo(controller=ctl)

            async def admit(
                body: dict[str, Any],
                *,
                op: str,
                agent_name: str,
                old: dict[str, Any] | None = None,
                subresource: str | None = None,
                namespace: str = ns,
            ) -> None:
                handler = (
                    handlers.validate_agent_scale
                    if subresource == "scale"
                    else handlers.validate_agent_budget
                )
                await handler(
                    body=kopf.Body(body),
                    old=kopf.Body(old) if old is not None else None,
                    name=agent_name,
                    namespace=namespace,
                    memo=memo,
                    operation=op,
                    subresource=subresource,
                )

            # Over budget: refused, although the cache knows of no Agent at all.
            with pytest.raises(kopf.AdmissionError, match=r"spec\.limits\.agents"):
                await admit(agent("three"), op="CREATE", agent_name="three")
            with pytest.raises(kopf.AdmissionError, match=r"spec\.limits\.replicas"):
                await admit(
                    with_replicas(live["one"], 3), op="UPDATE", agent_name="one", old=live["one"]
                )
            with pytest.raises(kopf.AdmissionError, match=r"spec\.limits\.replicas"):
                await admit(
                    scale(3), op="UPDATE", agent_name="two", old=scale(2), subresource="scale"
                )
            # Nothing that keeps or lowers usage is refused.
            await admit(live["one"], op="UPDATE", agent_name="one", old=live["one"])
            await admit(
                with_replicas(live["one"], 1), op="UPDATE", agent_name="one", old=live["one"]
            )
            await admit(scale(1), op="UPDATE", agent_name="two", old=scale(2), subresource="scale")
            # A namespace of no tenant has no budget.
            await admit(agent("free"), op="CREATE", agent_name="free", namespace="default")

    asyncio.run(review())


def test_budget_an_over_budget_tenant_can_still_scale_down_relabel_and_delete(
    kubectl: Kubectl, operator: OperatorProcess, tenants: Tenants
) -> None:
    """A budget lowered below the usage: every change that keeps or lowers usage passes.

    On the code before the fix even a scale-down was refused:
        KubectlError: kubectl scale agent a1 --replicas=1 exited 1: Error from server:
        admission webhook "agent-scale-budget.bmad.dev" denied the request: tenant
        over-27660c allows 1 Agents (spec.limits.agents) and this would make 3: ...
    """
    name = tenants.name("over")
    ns = f"{name}-ns"
    tenants.apply(tenant(name, [ns], limits={"agents": 3, "replicas": 9}))
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(ns)
    for n in ("a1", "a2", "a3"):
        k.apply(agent(n, replicas=3))
    k.run(
        "patch",
        "agent",
        "a3",
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":["example.com/hold"]}}',
    )
    kubectl.run(
        "patch",
        "tenant",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"limits": {"agents": 1, "replicas": 2}}}),
    )
    # Lowering or keeping usage: all pass.
    k.run("scale", "agent", "a1", "--replicas=1")
    k.run("label", "agent", "a2", "team=blue")
    k.run("annotate", "agent", "a2", "note=kept")
    k.apply(agent("a2", replicas=3))  # the same size again
    # Growing: refused, with what to change.
    grow = k.run("scale", "agent", "a1", "--replicas=2", check=False)
    assert grow.returncode != 0
    assert "spec.limits.replicas" in grow.stderr
    more = k.run("apply", "-f", "-", stdin=json.dumps(agent("a4")), check=False)
    assert more.returncode != 0
    assert "spec.limits.agents" in more.stderr or "exceeded quota" in more.stderr
    # Deleting, and removing a finalizer from an Agent being deleted: pass.
    k.run("delete", "agent", "a2", "--wait=true", "--timeout=30s", timeout=40)
    k.run("delete", "agent", "a3", "--wait=false")
    k.run("patch", "agent", "a3", "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    eventually(lambda: not k.exists("agent", "a3"), timeout=30, what="a3 gone")
    assert [a["metadata"]["name"] for a in k.json("get", "agents")["items"]] == ["a1"]


def test_budget_with_the_operator_down_only_growth_is_blocked(
    kubectl: Kubectl, operator: OperatorProcess, tenants: Tenants
) -> None:
    """failurePolicy Fail, scoped by matchConditions to the writes that raise usage: an
    operator that is down blocks creates and scale-ups in tenant namespaces, nothing else.

    On the code before the fix a label change failed too:
        KubectlError: kubectl label agent one team=red exited 1: ... failed calling webhook
    """
    name = tenants.name("down")
    ns = f"{name}-ns"
    tenants.apply(tenant(name, [ns], limits={"agents": 5, "replicas": 10}))
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(ns)
    k.apply(agent("one", replicas=2))
    operator.kill()
    try:
        k.run("label", "agent", "one", "team=red")
        k.run("scale", "agent", "one", "--replicas=1")
        k.run("patch", "agent", "one", "--type=merge", "-p", '{"spec":{"paused":true}}')
        created = k.run("apply", "-f", "-", stdin=json.dumps(agent("two")), check=False)
        assert created.returncode != 0
        assert "failed calling webhook" in created.stderr
        grown = k.run("scale", "agent", "one", "--replicas=2", check=False)
        assert grown.returncode != 0
        assert "failed calling webhook" in grown.stderr
        k.run("delete", "agent", "one", "--wait=true", "--timeout=30s", timeout=40)
    finally:
        operator.start()
    k.apply(agent("two"))  # the operator is back: growth within budget passes again


def _ca_bundles(kubectl: Kubectl) -> list[str]:
    config = kubectl.json("get", "validatingwebhookconfiguration", CONFIGURATION)
    return [w["clientConfig"]["caBundle"] for w in config["webhooks"]]


def test_budget_webhook_certificate_is_stable_across_restarts(
    kubectl: Kubectl, operator: OperatorProcess, tenants: Tenants
) -> None:
    """The webhook's certificate is made once, kept in a Secret of the operator's
    namespace, and reused by every start: the caBundle does not change.

    On the code before the fix a new CA was made at every start:
        AssertionError: assert ['LS0tLS1CRUdJTi...'] == ['LS0tLS1CRUdJTi...']
    """
    before = _ca_bundles(kubectl)
    # (An instance an earlier test SIGKILLed may have left its own directory there.)
    written = set(operator.tmp_dir.glob("bmad-webhook-*"))
    assert written, "the key pair was not written there"
    operator.stop()
    # A clean stop removes its copy of the webhook's private key from disk (before: one
    # bmad-webhook-* directory per start, left in /tmp).
    left = set(operator.tmp_dir.glob("bmad-webhook-*"))
    assert left < written, (written, left)
    assert len(written - left) == 1, (written, left)
    operator.start()
    assert _ca_bundles(kubectl) == before
    secret = kubectl.in_namespace(SYSTEM_NS).json("get", "secret", "bmad-operator-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["ca.crt"]) == base64.b64decode(before[0])
    operator.kill()
    operator.start()
    again = kubectl.in_namespace(SYSTEM_NS).json("get", "secret", "bmad-operator-webhook-tls")
    assert again["metadata"]["uid"] == secret["metadata"]["uid"]
    assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    assert _ca_bundles(kubectl) == before
    # ... and the API server trusts the restarted webhook: a refusal comes from it.
    name = tenants.name("restart")
    ns = f"{name}-ns"
    tenants.apply(tenant(name, [ns], limits={"agents": 0}))
    wait_tenant(kubectl, name)
    refused = kubectl.in_namespace(ns).run(
        "apply", "-f", "-", stdin=json.dumps(agent("x")), check=False
    )
    assert refused.returncode != 0
    assert "spec.limits.agents" in refused.stderr or "exceeded quota" in refused.stderr


def test_budget_webhook_configuration_goes_with_the_operators_namespace(
    kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    """Uninstalling deletes the operator's namespace; the garbage collector then deletes
    the webhook configuration, which names that namespace as its owner. A copy of the
    running configuration, owned by a throwaway namespace, shows it on the real API server.

    On the code before the fix the configuration had no owner and stayed behind:
        AssertionError: assert None == [{'apiVersion': 'v1', 'kind': 'Namespace', ...}]
    """
    live = kubectl.json("get", "validatingwebhookconfiguration", CONFIGURATION)
    owners = live["metadata"].get("ownerReferences")
    system = kubectl.json("get", "namespace", SYSTEM_NS)
    assert owners == [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "name": SYSTEM_NS,
            "uid": system["metadata"]["uid"],
        }
    ]
    owner = kubectl.json("get", "namespace", namespace)
    copy_name = f"bmad-it-{namespace}"[:63]
    copy = {
        "apiVersion": live["apiVersion"],
        "kind": live["kind"],
        "metadata": {
            "name": copy_name,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "name": namespace,
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
        # The same webhooks (same URL, same CA): harmless while both exist.
        "webhooks": live["webhooks"],
    }
    kubectl.apply(copy)
    try:
        kubectl.run("delete", "namespace", namespace, "--wait=false")
        eventually(
            lambda: not kubectl.exists("validatingwebhookconfiguration", copy_name),
            timeout=60,
            what="the garbage collector to delete the configuration with its namespace",
        )
    finally:
        kubectl.run(
            "delete", "validatingwebhookconfiguration", copy_name, "--ignore-not-found", check=False
        )
