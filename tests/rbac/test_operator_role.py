"""Issue 10, hole 4: the operator's RBAC is exactly what it calls, as the API server saw.

Run after the whole suite (scripts/test.sh does, with `-m rbac_audit`), on the same
test bed: the test bed audits every request of the operator's own user, and the
operator processes of the integration and e2e tests run as that user, bound to the
ClusterRole of manifests/rbac. This test reads that audit log and fails on:

- a call the role refused (a missing rule, or a call the operator should not make);
- a granted verb that no call used (a rule too many).

It runs on its own marker because "nothing used this rule" only means something after
the whole suite ran: on a subset, every rule the subset does not reach would fail.
`MAY_GO_UNUSED` names the few verbs granted for paths a run may not take (a read when
the watch's store misses an object, which CI run 7 hit and RBAC refused), each with why
it grants nothing more than the role already does.

Before the change it failed with, among others (the ClusterRole then granted every
verb on Secrets, namespaces, RoleBindings, Deployments and webhook configurations):
    Granted but never used, so remove each (or add a test that uses it):
      - ClusterRole/bmad-operator rule #4: verb delete on secrets (group core)
      - ClusterRole/bmad-operator rule #5: verb delete on namespaces (group core) ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from bmad_testbed import audit, rbac
from bmad_testbed.kubectl import Kubectl

pytestmark = pytest.mark.rbac_audit

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "manifests" / "rbac"
OPERATOR_NAMESPACE = "bmad-system"

# Checks the API server makes inside a request, which leave no audit event of their own.
IMPLIED = rbac.Implied(
    # The tenant-admin RoleBindings the Tenant reconciler writes refer to this role.
    binds=("ClusterRole/bmad-tenant-admin",),
    # Owned objects are created with a blocking owner reference to their owner.
    finalizers={
        ("", "serviceaccounts"): ("bmad.dev", "agents/finalizers"),
        ("", "configmaps"): ("bmad.dev", "agents/finalizers"),
        ("", "services"): ("bmad.dev", "agents/finalizers"),
        ("apps", "deployments"): ("bmad.dev", "agents/finalizers"),
        ("policy", "poddisruptionbudgets"): ("bmad.dev", "agents/finalizers"),
        ("", "secrets"): ("bmad.dev", "integrations/finalizers"),
    },
)


# Granted for code paths a whole run may not take, each with why it grants nothing the
# role does not already allow. Everything else unused fails.
MAY_GO_UNUSED = {
    # A GET when the watch's store misses the object (reconcilers.tenant for a billing
    # Integration, admission for an Agent): `list` on the same kinds is granted.
    ("get", "bmad.dev", "agents"): "store-miss read; list is granted",
    ("get", "bmad.dev", "integrations"): "store-miss read; list is granted",
}


def _all_events(log: Path) -> list[dict[str, Any]]:
    """The whole log of this test bed, the rotated files first.

    The HA tests run operators whose own namespace (BMAD_OPERATOR_SYSTEM_NAMESPACE) is
    the test's namespace, with the manifests' leader-election Role bound there: their
    Lease calls stand for calls in bmad-system, where that Role is bound in a cluster.
    """
    rotated = sorted(log.parent.glob(f"{log.stem}-*{log.suffix}"))
    events: list[dict[str, Any]] = []
    for path in [*rotated, log]:
        for event in audit.entries(path):
            ref = event.get("objectRef") or {}
            if ref.get("resource") == "leases" and ref.get("namespace"):
                event["objectRef"] = {**ref, "namespace": OPERATOR_NAMESPACE}
            events.append(event)
    return events


def test_hole4_operator_role_grants_exactly_the_calls_in_the_audit_log(
    kubectl: Kubectl, testbed_env: dict[str, str]
) -> None:
    docs = list(yaml.safe_load_all(kubectl.out("kustomize", str(ROLES))))
    roles = rbac.roles_for_subject(
        docs, kind="ServiceAccount", name="bmad-operator", namespace=OPERATOR_NAMESPACE
    )
    assert roles, "nothing in manifests/rbac is bound to the operator's ServiceAccount"
    report = rbac.analyse(
        _all_events(Path(testbed_env["BMAD_AUDIT_LOG"])),
        user=testbed_env["BMAD_OPERATOR_USER"],
        roles=roles,
        implied=IMPLIED,
    )
    out = Path(os.environ.get("BMAD_TESTBED_DIR", testbed_env.get("BMAD_TESTBED_DIR", "/tmp")))
    (out / "rbac-audit.md").write_text(report.markdown(roles))
    assert report.requests > 1000, (
        f"only {report.requests} audited requests of the operator: run the whole suite first "
        "(scripts/test.sh runs this test after it)"
    )
    report.unused = [g for g in report.unused if (g.verb, g.group, g.resource) not in MAY_GO_UNUSED]
    assert report.ok, report.failure_message(roles_file="manifests/rbac")
