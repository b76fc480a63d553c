"""The comparison of the operator's roles with its calls in the audit log.

Audit events here are written the way the API server writes them (Metadata level,
the fields the comparison reads); the integration test runs the same code on the test
bed's real log after the whole suite.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bmad_testbed import audit, rbac

pytestmark = pytest.mark.unit

USER = "bmad-operator"
_ids = itertools.count()


def event(
    verb: str,
    resource: str,
    *,
    group: str = "",
    namespace: str = "",
    name: str = "",
    subresource: str = "",
    code: int = 200,
    decision: str = "allow",
    message: str = "",
    uri: str = "",
    user: str = USER,
    audit_id: str | None = None,
    stage: str = "ResponseComplete",
) -> dict[str, Any]:
    ref: dict[str, Any] = {"resource": resource, "apiVersion": "v1"}
    if group:
        ref["apiGroup"] = group
    if namespace:
        ref["namespace"] = namespace
    if name:
        ref["name"] = name
    if subresource:
        ref["subresource"] = subresource
    status: dict[str, Any] = {"metadata": {}, "code": code}
    if message:
        status["message"] = message
    return {
        "kind": "Event",
        "auditID": audit_id or f"id-{next(_ids)}",
        "stage": stage,
        "requestURI": uri or f"/api/v1/{resource}",
        "verb": verb,
        "user": {"username": user},
        "objectRef": ref,
        "responseStatus": status,
        "annotations": {"authorization.k8s.io/decision": decision},
    }


def cluster_role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "ClusterRole", "metadata": {"name": name}, "rules": rules}


def sa_subject() -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": "bmad-operator", "namespace": "bmad-system"}


def manifests(*rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        cluster_role("op", list(rules)),
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "op"},
            "roleRef": {"kind": "ClusterRole", "name": "op"},
            "subjects": [sa_subject()],
        },
    ]


def roles(*rules: dict[str, Any]) -> list[rbac.Role]:
    return rbac.roles_for_subject(
        manifests(*rules), kind="ServiceAccount", name="bmad-operator", namespace="bmad-system"
    )


def test_roles_bound_to_the_service_account_with_their_scope() -> None:
    docs = [
        *manifests({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}),
        {
            "kind": "Role",
            "metadata": {"name": "leases", "namespace": "bmad-system"},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"]}],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "leases", "namespace": "bmad-system"},
            "roleRef": {"kind": "Role", "name": "leases"},
            "subjects": [sa_subject()],
        },
        cluster_role("someone-elses", []),
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "other"},
            "roleRef": {"kind": "ClusterRole", "name": "someone-elses"},
            "subjects": [{"kind": "ServiceAccount", "name": "bmad-operator", "namespace": "x"}],
        },
    ]
    found = rbac.roles_for_subject(
        docs, kind="ServiceAccount", name="bmad-operator", namespace="bmad-system"
    )
    assert [(r.ref, r.bound_in) for r in found] == [
        ("ClusterRole/op", ("",)),
        ("Role/bmad-system/leases", ("bmad-system",)),
    ]


def test_a_used_rule_passes_and_an_unused_verb_is_named() -> None:
    report = rbac.analyse(
        [event("get", "secrets", namespace="a", name="creds")],
        user=USER,
        roles=roles({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}),
    )
    assert not report.refused
    assert [(g.verb, g.resource) for g in report.unused] == [("list", "secrets")]
    message = report.failure_message(roles_file="role.yaml")
    assert "ClusterRole/op rule #0: verb list on secrets (group core)" in message
    assert "remove" in message


def test_a_refused_call_says_which_rule_to_add() -> None:
    report = rbac.analyse(
        [
            event(
                "list",
                "scaledobjects",
                group="keda.sh",
                decision="forbid",
                code=403,
                uri="/apis/keda.sh/v1alpha1/scaledobjects",
            )
        ],
        user=USER,
        roles=[],
    )
    (refusal,) = report.refused
    assert refusal.call == rbac.Call("list", "keda.sh", "scaledobjects", "", "")
    message = report.failure_message(roles_file="role.yaml")
    assert 'add: {apiGroups: ["keda.sh"], resources: ["scaledobjects"], verbs: ["list"]}' in message


def test_other_users_and_discovery_are_ignored() -> None:
    discovery = event("get", "x")
    del discovery["objectRef"]
    report = rbac.analyse(
        [event("delete", "namespaces", name="x", user="admin"), discovery],
        user=USER,
        roles=[],
    )
    assert report.calls == {}
    assert report.ok


def test_an_apply_that_created_its_object_was_also_authorised_as_create() -> None:
    rules = {
        "apiGroups": [""],
        "resources": ["resourcequotas"],
        "resourceNames": ["q"],
        "verbs": ["create", "patch"],
    }
    report = rbac.analyse(
        [event("patch", "resourcequotas", namespace="t", name="q", code=201)],
        user=USER,
        roles=roles(rules),
    )
    assert report.ok, report.failure_message(roles_file="-")


def test_a_post_is_never_matched_by_resource_names() -> None:
    rules = {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["tls"],
        "verbs": ["create"],
    }
    # The log names the created object, but RBAC authorised the POST without a name.
    report = rbac.analyse(
        [event("create", "secrets", namespace="bmad-system", name="tls", code=201)],
        user=USER,
        roles=roles(rules),
    )
    assert [g.name for g in report.unused] == ["tls"]


def test_a_list_of_one_name_matches_resource_names() -> None:
    rules = {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["c"],
        "verbs": ["list"],
    }
    uri = "/api/v1/namespaces/n/configmaps?fieldSelector=metadata.name%3Dc"
    report = rbac.analyse(
        [event("list", "configmaps", namespace="n", uri=uri)], user=USER, roles=roles(rules)
    )
    assert report.ok, report.failure_message(roles_file="-")


def test_role_binding_writes_imply_bind_and_owned_creates_imply_finalizers() -> None:
    rules = [
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["rolebindings"],
            "verbs": ["patch"],
        },
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "resourceNames": ["bmad-tenant-admin"],
            "verbs": ["bind"],
        },
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create"]},
        {"apiGroups": ["bmad.dev"], "resources": ["agents/finalizers"], "verbs": ["update"]},
        {"apiGroups": ["bmad.dev"], "resources": ["workflows/finalizers"], "verbs": ["update"]},
    ]
    implied = rbac.Implied(
        binds=["ClusterRole/bmad-tenant-admin"],
        finalizers={("apps", "deployments"): ("bmad.dev", "agents/finalizers")},
    )
    report = rbac.analyse(
        [
            event(
                "patch", "rolebindings", group="rbac.authorization.k8s.io", namespace="t", name="b"
            ),
            event("create", "deployments", group="apps", namespace="t", name="d", code=201),
        ],
        user=USER,
        roles=roles(*rules),
        implied=implied,
    )
    assert [g.resource for g in report.unused] == ["workflows/finalizers"]


def test_a_watch_logged_twice_counts_once() -> None:
    started = event("watch", "agents", group="bmad.dev", audit_id="w", stage="ResponseStarted")
    complete = event("watch", "agents", group="bmad.dev", audit_id="w")
    report = rbac.analyse([started, complete], user=USER, roles=[])
    assert report.calls == {rbac.Call("watch", "bmad.dev", "agents", "", ""): 1}
    assert report.requests == 1


def test_refusals_inside_an_allowed_request() -> None:
    terminating = event(
        "patch",
        "configmaps",
        namespace="gone",
        name="c",
        code=403,
        message='configmaps "c" is forbidden: unable to create new content in namespace gone '
        "because it is being terminated",
    )
    create_inside_apply = event(
        "patch",
        "secrets",
        namespace="n",
        name="s-binding",
        code=403,
        message='secrets "s-binding" is forbidden: User "bmad-operator" cannot create resource '
        '"secrets" in API group "" in the namespace "n"',
    )
    owner = event(
        "patch",
        "deployments",
        group="apps",
        namespace="n",
        name="d",
        code=403,
        message='deployments.apps "d" is forbidden: cannot set blockOwnerDeletion if an '
        "ownerReference refers to a resource you can't set finalizers on: User "
        '"bmad-operator" cannot update resource "agents/finalizers" in API group "bmad.dev" '
        'in the namespace "n"',
    )
    report = rbac.analyse([terminating, create_inside_apply, owner], user=USER, roles=[])
    assert [r.call for r in report.refused] == [
        rbac.Call("create", "", "secrets", "n", "s-binding"),
        rbac.Call("update", "bmad.dev", "agents/finalizers", "n", ""),
    ]


def test_markdown_table_lists_each_rule_with_the_calls_that_used_it() -> None:
    role = roles({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch"]})
    report = rbac.analyse(
        [event("get", "secrets", namespace="a", name="x")] * 1
        + [event("get", "secrets", namespace="b", name="y")],
        user=USER,
        roles=role,
    )
    table = report.markdown(role)
    assert "| ClusterRole/op | 0 | core | `secrets` | — | `get`, `patch` | get (2) |" in table


def test_audit_since_reads_across_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text(json.dumps({"n": 1}) + "\n")
    start = audit.mark(log)
    with log.open("a") as fh:
        fh.write(json.dumps({"n": 2}) + "\n")
    os.rename(log, tmp_path / "audit-2026-11-30T07-00-00.000.log")
    log.write_text(json.dumps({"n": 3}) + "\n")
    assert [e["n"] for e in audit.entries_after(start)] == [2, 3]
    assert [e["n"] for e in audit.entries_after(audit.mark(log))] == []


def test_a_call_allowed_then_but_matched_by_no_rule_now_is_uncovered() -> None:
    """A log written under a broader binding still shows what the narrower roles lack."""
    role = roles({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    report = rbac.analyse(
        [
            event("get", "secrets", namespace="a", name="x"),
            event("delete", "secrets", namespace="a", name="x"),
        ],
        user=USER,
        roles=role,
    )
    assert report.uncovered == [rbac.Call("delete", "", "secrets", "a", "x")]
    assert not report.ok
    assert "no rule of these roles allows it" in report.failure_message(roles_file="r")
