"""NetworkPolicy for real: the policies a Tenant renders are enforced on the node.

Two Tenants, each with a namespace and an Agent in it. A pod in tenant A's namespace
cannot open a connection to B's agent; from A's own namespace the same request to A's
agent succeeds (and B's from B's); the operator's namespace reaches both. kube-router
enforces the policies; every connection stays on the node's bridge.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from bmad_testbed import kubectl as kubectl_mod

from .helpers import SYSTEM_NS, agent, run_client, service_url, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

# kube-router adds a new client pod's address to the policies' sets when it sees the
# pod: allowed requests get up to this many tries, a second apart.
ALLOWED_TRIES = 30


@pytest.fixture
def two_tenants(real_kubectl: kubectl_mod.Kubectl) -> Iterator[tuple[str, str]]:
    suffix = secrets.token_hex(3)
    names = (f"np-a-{suffix}", f"np-b-{suffix}")
    for name in names:
        real_kubectl.apply(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Tenant",
                "metadata": {"name": name},
                "spec": {"namespaces": [name], "deletionPolicy": "Delete"},
            }
        )
    try:
        for name in names:
            wait_ready(real_kubectl, "tenant", name, "", timeout=120)
        yield names
    finally:
        for name in names:
            real_kubectl.run("delete", "tenant", name, "--wait=false", check=False)
            real_kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def test_tenant_policies_fence_agents_on_the_real_node(
    real_kubectl: kubectl_mod.Kubectl, two_tenants: tuple[str, str]
) -> None:
    kubectl = real_kubectl
    ns_a, ns_b = two_tenants
    policies = kubectl.json("get", "networkpolicies", "-n", ns_b)["items"]
    assert "bmad-default-deny-ingress" in {p["metadata"]["name"] for p in policies}
    for ns in (ns_a, ns_b):
        kubectl.apply(agent("target", ns))
    for ns in (ns_a, ns_b):
        wait_ready(kubectl, "agent", "target", ns)
    url_a = service_url(kubectl, "target", ns_a)
    url_b = service_url(kubectl, "target", ns_b)

    # From A's namespace: A's agent answers; then, from the same pod (so the enforcer
    # knows its address), B's agent refuses or times out on every try.
    own, crossed = run_client(kubectl, ns_a, [(url_a, ALLOWED_TRIES), (url_b, 3)])
    assert own == "OK 200"
    assert crossed.startswith("FAIL"), crossed
    # From B's namespace, B's agent answers.
    assert run_client(kubectl, ns_b, [(url_b, ALLOWED_TRIES)]) == ["OK 200"]
    # The operator's namespace reaches every tenant's agents.
    from_system = run_client(kubectl, SYSTEM_NS, [(url_a, ALLOWED_TRIES), (url_b, ALLOWED_TRIES)])
    assert from_system == ["OK 200", "OK 200"]
