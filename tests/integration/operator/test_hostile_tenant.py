"""A hostile tenant admin, by impersonation on the real API server (issue 10).

Alice administers tenant A; tenant B (Bob's) runs an Agent with a credentials Secret
and an Integration. Alice, through the API server with her own identity
(`kubectl --as`), tries to read, change or reach everything of B's, the operator's
secrets, and the fences around her own namespace. Every attempt must be refused; the
suite writes each attempt and the API server's answer to
`$BMAD_TESTBED_DIR/hostile-tenant.txt` (and into the failure message), so the list is
the record of what was tried. Control attempts in Alice's own namespace (and Bob's
in his) must succeed: otherwise "everything refused" would prove nothing.

What the API server cannot see (conversations and tasks inside a runtime, the task
bus in Redis) is fenced by the agent API's auth and the tenant NetworkPolicies: those
are proven on the real node (tests/e2e/realnode/test_network_policy.py) and by the
runtime's auth tests; here, the ways to them through the API server (service proxy,
port-forward, exec, tokens of B's service accounts, B's binding Secrets) are tried.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import Tenants, agent, condition, tenant, wait_tenant

pytestmark = pytest.mark.integration

SYSTEM_NS = "bmad-system"


@dataclass(frozen=True)
class Attempt:
    what: str
    args: tuple[str, ...]
    namespace: str | None = None
    stdin: str | None = None


@dataclass(frozen=True)
class Answer:
    attempt: Attempt
    returncode: int
    said: str
    refused: bool

    def line(self) -> str:
        verdict = "REFUSED" if self.refused else "ALLOWED"
        lines = self.said.strip().splitlines() or ["(no output)"]
        # kubectl apply says "error when retrieving ..." first, the API server's reason after
        first = next(
            (ln for key in REASONS for ln in lines if key in ln.lower()),
            lines[0],
        )
        return f"{verdict:8} {self.attempt.what}: {first[:220]}"


# How the API server says no: RBAC (Forbidden), admission (denied), the schema (Invalid).
REFUSALS = ("forbidden", "denied", "invalid")
# The line of kubectl's output that gives the reason, best first.
REASONS = ("cannot", "is invalid", "denied", "forbidden")


def _as(kubectl: Kubectl, user: str) -> Callable[[Attempt], Answer]:
    def run(attempt: Attempt) -> Answer:
        extra = [f"--namespace={attempt.namespace}"] if attempt.namespace else []
        proc = kubectl.run(f"--as={user}", *extra, *attempt.args, stdin=attempt.stdin, check=False)
        if attempt.args[:2] == ("auth", "can-i"):
            # A SubjectAccessReview: the API server answers yes or no.
            verdict = proc.stdout.strip()
            return Answer(attempt, proc.returncode, f"can-i: {verdict}", verdict == "no")
        said = proc.stderr if proc.returncode else proc.stdout
        refused = proc.returncode != 0 and any(w in said.lower() for w in REFUSALS)
        return Answer(attempt, proc.returncode, said, refused)

    return run


def _hostile_attempts(ns_a: str, ns_b: str, tenant_a: str, tenant_b: str) -> list[Attempt]:
    victim_patch = json.dumps({"spec": {"replicas": 0}})
    forged = agent("forged")
    forged["metadata"]["namespace"] = ns_b
    escalate = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "alice-cluster-admin", "namespace": ns_a},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "cluster-admin",
        },
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "x"}],
    }
    grab = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": f"grab-{tenant_b}"},
        "spec": {"namespaces": [ns_b]},
    }
    identity = agent(
        "impostor",
        runtime={"env": [{"name": "bmad_agent_namespace", "value": ns_b}]},
    )
    return [
        # B's objects: read
        Attempt("list B's Agents", ("get", "agents"), ns_b),
        Attempt("read B's Agent (its status: usage)", ("get", "agent", "victim"), ns_b),
        Attempt("list B's Secrets", ("get", "secrets"), ns_b),
        Attempt("read B's credentials Secret", ("get", "secret", "victim-cred"), ns_b),
        Attempt("read B's binding Secret", ("get", "secret", "victim-db-binding"), ns_b),
        Attempt("read B's ConfigMaps (agent.json)", ("get", "configmaps"), ns_b),
        Attempt("list B's Integrations", ("get", "integrations"), ns_b),
        Attempt("list B's Workflows (tasks, artifacts)", ("get", "workflows"), ns_b),
        Attempt("list B's Pods", ("get", "pods"), ns_b),
        Attempt("read B's Events", ("get", "events"), ns_b),
        Attempt("list Agents in every namespace", ("get", "agents", "--all-namespaces")),
        Attempt("list Secrets in every namespace", ("get", "secrets", "--all-namespaces")),
        Attempt("read B's Tenant (usage, billing)", ("get", "tenant", tenant_b)),
        Attempt("list Tenants", ("get", "tenants")),
        # B's objects: change
        Attempt(
            "create an Agent in B's namespace",
            ("apply", "-f", "-"),
            ns_b,
            json.dumps(forged),
        ),
        Attempt(
            "scale B's Agent to zero (patch)",
            ("patch", "agent", "victim", "--type=merge", "-p", victim_patch),
            ns_b,
        ),
        Attempt(
            "scale B's Agent (scale subresource)", ("scale", "agent/victim", "--replicas=0"), ns_b
        ),
        Attempt("delete B's Agent", ("delete", "agent", "victim", "--wait=false"), ns_b),
        Attempt(
            "replace B's credentials",
            ("create", "secret", "generic", "planted", "--from-literal=password=x"),
            ns_b,
        ),
        Attempt(
            "claim B's namespace with a new Tenant", ("apply", "-f", "-"), None, json.dumps(grab)
        ),
        # reach B's agents and their tasks through the API server
        Attempt(
            "proxy to B's agent Service",
            ("get", "--raw", f"/api/v1/namespaces/{ns_b}/services/victim:http/proxy/readyz"),
        ),
        Attempt("port-forward to B's pods", ("auth", "can-i", "create", "pods/portforward"), ns_b),
        Attempt("exec into B's pods", ("auth", "can-i", "create", "pods/exec"), ns_b),
        Attempt("a token of B's agent ServiceAccount", ("create", "token", "victim"), ns_b),
        # the operator's secrets and the cluster's controls
        Attempt("list the operator's Secrets", ("get", "secrets"), SYSTEM_NS),
        Attempt("read the operator's Lease", ("get", "leases"), SYSTEM_NS),
        Attempt(
            "patch the admission webhooks",
            (
                "patch",
                "validatingwebhookconfigurations",
                "bmad-operator",
                "--type=merge",
                "-p",
                '{"metadata":{"labels":{"x":"y"}}}',
            ),
        ),
        Attempt("delete the Agent CRD", ("delete", "crd", "agents.bmad.dev", "--wait=false")),
        Attempt("impersonate another user", ("auth", "can-i", "impersonate", "users")),
        # lift the fences around her own namespace
        Attempt(
            "move her namespace to B's tenant",
            ("label", "namespace", ns_a, f"bmad.dev/tenant={tenant_b}", "--overwrite"),
        ),
        Attempt(
            "relax Pod Security on her namespace",
            (
                "label",
                "namespace",
                ns_a,
                "pod-security.kubernetes.io/enforce=privileged",
                "--overwrite",
            ),
        ),
        Attempt(
            "delete her default-deny NetworkPolicy",
            ("delete", "networkpolicy", "bmad-default-deny-ingress", "--wait=false"),
            ns_a,
        ),
        Attempt(
            "raise her own quota",
            (
                "patch",
                "resourcequota",
                "bmad-tenant-quota",
                "--type=merge",
                "-p",
                '{"spec":{"hard":{"pods":"1000"}}}',
            ),
            ns_a,
        ),
        Attempt(
            "raise her Tenant's limits",
            (
                "patch",
                "tenant",
                tenant_a,
                "--type=merge",
                "-p",
                '{"spec":{"limits":{"agents":1000}}}',
            ),
        ),
        Attempt(
            "bind cluster-admin in her namespace", ("apply", "-f", "-"), ns_a, json.dumps(escalate)
        ),
        Attempt(
            "forge her Agent's status (usage)",
            (
                "patch",
                "agent",
                "mine",
                "--subresource=status",
                "--type=merge",
                "-p",
                '{"status":{"usage":{"tokensThisPeriod":0}}}',
            ),
            ns_a,
        ),
        Attempt(
            "run a pod of her own", ("run", "shell", "--image=busybox", "--restart=Never"), ns_a
        ),
        Attempt(
            "give her agent B's namespace as its identity (env)",
            ("apply", "-f", "-"),
            ns_a,
            json.dumps(identity),
        ),
    ]


def _record(answers: list[Answer]) -> str:
    text = "\n".join(a.line() for a in answers) + "\n"
    directory = os.environ.get("BMAD_TESTBED_DIR")
    if directory and Path(directory).is_dir():
        (Path(directory) / "hostile-tenant.txt").write_text(text)
    return text


def test_hostile_tenant_admin_is_refused_everything_of_another_tenant(
    kubectl: Kubectl,
    operator: OperatorProcess,
    tenants: Tenants,
) -> None:
    a, b = tenants.name("hostile"), tenants.name("victim")
    ns_a, ns_b = f"{a}-ns", f"{b}-ns"
    alice, bob = f"alice-{a}", f"bob-{b}"
    tenants.apply(tenant(a, [ns_a], admins=[{"kind": "User", "name": alice}], quota={"pods": "10"}))
    tenants.apply(tenant(b, [ns_b], admins=[{"kind": "User", "name": bob}]))
    wait_tenant(kubectl, a)
    wait_tenant(kubectl, b)

    as_alice, as_bob = _as(kubectl, alice), _as(kubectl, bob)
    # Bob's tenant: an Agent, a credentials Secret, an Integration using it.
    b_k = kubectl.in_namespace(ns_b)
    b_k.run("create", "secret", "generic", "victim-cred", "--from-literal=password=s3cr3t")
    b_k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "victim-db"},
            "spec": {
                "type": "redis",
                "redis": {"host": "127.0.0.1", "port": 1},
                "secretRef": {"name": "victim-cred"},
            },
        }
    )
    victim = as_bob(
        Attempt("Bob creates his Agent", ("apply", "-f", "-"), ns_b, json.dumps(agent("victim")))
    )
    assert victim.returncode == 0, victim.said

    def ready(ns: str, name: str) -> bool:
        obj = kubectl.in_namespace(ns).json("get", "agent", name)
        cond = condition(obj, "Ready")
        return bool(cond and cond["status"] == "True")

    eventually(lambda: ready(ns_b, "victim"), timeout=120, what="B's agent Ready")

    # Controls: each admin is allowed in their own namespace.
    controls = [
        as_alice(
            Attempt(
                "Alice creates her Agent", ("apply", "-f", "-"), ns_a, json.dumps(agent("mine"))
            )
        ),
        as_alice(Attempt("Alice lists her Agents", ("get", "agents"), ns_a)),
        as_alice(
            Attempt(
                "Alice creates a Secret",
                ("create", "secret", "generic", "own", "--from-literal=k=v"),
                ns_a,
            )
        ),
        as_bob(Attempt("Bob reads his Agent", ("get", "agent", "victim"), ns_b)),
        as_bob(Attempt("Bob reads his Secret", ("get", "secret", "victim-cred"), ns_b)),
    ]
    failed_controls = [c.line() for c in controls if c.returncode != 0]
    assert not failed_controls, "an admin was refused in their own namespace:\n" + "\n".join(
        failed_controls
    )

    answers = [as_alice(attempt) for attempt in _hostile_attempts(ns_a, ns_b, a, b)]
    report = _record(answers)
    allowed = [a.line() for a in answers if not a.refused]
    assert not allowed, (
        "a hostile tenant admin was allowed:\n" + "\n".join(allowed) + "\n\nall:\n" + report
    )

    # Nothing of B's changed: the refusals were refusals, not half-done writes.
    after = b_k.json("get", "agent", "victim")
    assert after["spec"]["replicas"] == 1
    assert not b_k.exists("agent", "forged")
    assert not b_k.exists("secret", "planted")
    ns_labels = kubectl.json("get", "namespace", ns_a)["metadata"]["labels"]
    assert ns_labels["bmad.dev/tenant"] == a
    assert ns_labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert not kubectl.exists("tenant", f"grab-{b}")
