"""The kustomize bases in manifests/ build, and say what the docs promise.

`kubectl kustomize` runs offline (no API server), so these are unit tests: they pin
that the default install composes, that the sample Agents are valid for the models,
that the operator's RBAC stays least-privilege and that its pod runs restricted.
"""

from __future__ import annotations

import decimal
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from bmad_crds.v1alpha1 import agent, common
from bmad_integrations.usage import prices as usage_prices
from bmad_operator import settings
from bmad_testbed import build

pytestmark = pytest.mark.unit

Obj = dict[str, Any]

REPO = Path(__file__).resolve().parents[3]
MANIFESTS = REPO / "manifests"
SAMPLES = MANIFESTS / "samples"
BMAD_ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")
FULL = ("get", "list", "watch", "create", "patch", "update", "delete")


def kubectl_binary() -> Path:
    """kubectl from $BMAD_KUBECTL, the PATH, or the test bed's cache (never built here)."""
    candidates: list[Path] = []
    if os.environ.get("BMAD_KUBECTL"):
        candidates.append(Path(os.environ["BMAD_KUBECTL"]))
    on_path = shutil.which("kubectl")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(build.cache_dir() / "bin" / f"k8s-{build.KUBERNETES_VERSION}" / "kubectl")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "no kubectl found to run `kubectl kustomize`: set BMAD_KUBECTL, put kubectl on "
        f"the PATH, or run `bmad testbed build` (looked at: {', '.join(map(str, candidates))})"
    )


def kustomize(directory: Path) -> list[Obj]:
    result = subprocess.run(
        [str(kubectl_binary()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"kubectl kustomize {directory.relative_to(REPO)} failed:\n{result.stderr}"
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objs: Iterable[Mapping[str, Any]], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return dict(found[0])


def permissions(role: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role.get("rules", [])
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


@pytest.fixture(scope="module")
def default_objs() -> list[Obj]:
    return kustomize(MANIFESTS / "default")


@pytest.fixture(scope="module")
def sample_objs() -> list[Obj]:
    return kustomize(SAMPLES)


@pytest.fixture(scope="module")
def operator_role(default_objs: list[Obj]) -> Obj:
    return one(default_objs, "ClusterRole", "bmad-operator")


@pytest.fixture(scope="module")
def operator_deployment(default_objs: list[Obj]) -> Obj:
    return one(default_objs, "Deployment", "bmad-operator")


@pytest.mark.parametrize("base", ["crd", "rbac", "manager", "monitoring", "samples", "default"])
def test_every_base_builds(base: str) -> None:
    assert kustomize(MANIFESTS / base)


def test_default_installs_crds_rbac_and_manager(default_objs: list[Obj]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in default_objs}
    crds = {name for kind, name in kinds if kind == "CustomResourceDefinition"}
    assert crds == {
        f"{plural}.{common.GROUP}" for plural in ("agents", "integrations", "workflows", "tenants")
    }
    assert {
        ("Namespace", "bmad-system"),
        ("ServiceAccount", "bmad-operator"),
        ("ClusterRole", "bmad-operator"),
        ("ClusterRoleBinding", "bmad-operator"),
        ("ClusterRole", "bmad-tenant-admin"),
        ("ClusterRole", "bmad-agent-viewer"),
        ("ClusterRole", "bmad-agent-editor"),
        ("Deployment", "bmad-operator"),
        ("PodDisruptionBudget", "bmad-operator"),
        ("Role", "bmad-operator-leader-election"),
        ("RoleBinding", "bmad-operator-leader-election"),
        ("Service", "bmad-operator-metrics"),
    } <= kinds
    assert "ServiceMonitor" not in {kind for kind, _ in kinds}, "monitoring is optional"


def test_crds_are_the_generated_ones(default_objs: list[Obj]) -> None:
    generated = {
        doc["metadata"]["name"]: doc
        for path in sorted((REPO / "crds" / "bases").glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
    }
    built = {
        o["metadata"]["name"]: o for o in default_objs if o["kind"] == "CustomResourceDefinition"
    }
    assert built == generated


def test_system_namespace_enforces_restricted(default_objs: list[Obj]) -> None:
    labels = one(default_objs, "Namespace", "bmad-system")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_operator_role_has_no_wildcards(operator_role: Obj) -> None:
    for rule in operator_role["rules"]:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert not any("*" in item for item in rule.get(field, [])), rule
        assert "nonResourceURLs" not in rule


# Which rules the operator needs is derived from what it calls: the audit log of a
# whole test run (tests/rbac/test_operator_role.py). These hold the shape of the role.
OWNED = (
    ("", "serviceaccounts"),
    ("", "configmaps"),
    ("", "services"),
    ("", "secrets"),
    ("apps", "deployments"),
    ("policy", "poddisruptionbudgets"),
)
FIXED_NAMES = {
    ("", "resourcequotas"),
    ("", "limitranges"),
    ("networking.k8s.io", "networkpolicies"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
    ("rbac.authorization.k8s.io", "clusterroles"),
}


def test_operator_role_leaves_owned_objects_to_the_garbage_collector(operator_role: Obj) -> None:
    """Issue 10, hole 4: what an Agent or Integration owns goes with its owner; the
    operator neither deletes nor replaces it."""
    granted = permissions(operator_role)
    for group, resource in OWNED:
        assert (group, resource, "delete") not in granted, resource
        assert (group, resource, "update") not in granted, resource


def test_operator_role_reads_and_writes_fixed_name_objects_by_name(operator_role: Obj) -> None:
    """Issue 10, hole 4: the tenant fences and the webhook configuration have fixed
    names, so every verb but list and watch names them."""
    for rule in operator_role["rules"]:
        kinds = {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
        if not kinds & FIXED_NAMES:
            continue
        verbs = set(rule["verbs"]) - {"list", "watch"}
        assert not verbs or rule.get("resourceNames"), rule


def test_operator_role_is_bound_to_its_service_account(default_objs: list[Obj]) -> None:
    binding = one(default_objs, "ClusterRoleBinding", "bmad-operator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "bmad-operator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "bmad-operator", "namespace": "bmad-system"}
    ]
    account = one(default_objs, "ServiceAccount", "bmad-operator")
    assert account["metadata"]["namespace"] == "bmad-system"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("bmad-agent-viewer", "rbac.authorization.k8s.io/aggregate-to-view"),
        ("bmad-agent-editor", "rbac.authorization.k8s.io/aggregate-to-edit"),
    ],
)
def test_user_roles_aggregate_into_the_built_in_ones(
    default_objs: list[Obj], name: str, label: str
) -> None:
    role = one(default_objs, "ClusterRole", name)
    assert role["metadata"]["labels"][label] == "true"
    resources = {resource for _, resource, _ in permissions(role)}
    assert {"agents", "integrations", "workflows"} <= resources
    assert not any("*" in part for perm in permissions(role) for part in perm)


def test_tenant_admin_edits_bmad_kinds_and_only_reads_workloads(default_objs: list[Obj]) -> None:
    granted = permissions(one(default_objs, "ClusterRole", "bmad-tenant-admin"))
    for resource in ("agents", "integrations", "workflows"):
        assert {(common.GROUP, resource, v) for v in ("create", "update", "delete")} <= granted
    for group, resource in (("", "secrets"), ("", "configmaps")):
        assert (group, resource, "create") in granted
    for group, resource in (("", "pods"), ("", "services"), ("apps", "deployments")):
        assert (group, resource, "list") in granted
        assert (group, resource, "delete") not in granted
    assert not any(resource == "tenants" for _, resource, _ in granted)
    assert not any("*" in part for perm in granted for part in perm)


def test_operator_runs_as_non_root_on_a_read_only_filesystem(operator_deployment: Obj) -> None:
    pod = operator_deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["serviceAccountName"] == "bmad-operator"


def test_operator_deployment_wiring(default_objs: list[Obj], operator_deployment: Obj) -> None:
    spec = operator_deployment["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"] == ["operator", "run"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BMAD_OPERATOR_RUNTIME_IMAGE"] == container["image"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8081, "webhook": 9443, "stripe-webhook": 8082}
    assert env["BMAD_OPERATOR_WEBHOOK_PORT"] == "9443"
    webhook = one(default_objs, "Service", "bmad-operator-webhook")
    assert env["BMAD_OPERATOR_WEBHOOK_SERVICE"] == "bmad-system/bmad-operator-webhook"
    assert env["BMAD_OPERATOR_WEBHOOK_HOST"] == "bmad-operator-webhook.bmad-system.svc"
    assert [(p["port"], p["targetPort"]) for p in webhook["spec"]["ports"]] == [(443, "webhook")]
    # The Stripe webhook's Service (the port is off until the ledger is configured).
    stripe = one(default_objs, "Service", "bmad-operator-stripe")
    assert [(p["port"], p["targetPort"]) for p in stripe["spec"]["ports"]] == [
        (80, "stripe-webhook")
    ]
    assert stripe["spec"]["selector"] == webhook["spec"]["selector"]
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "health",
        "scheme": "HTTP",
    }
    # Ready only while the budget webhook serves (/healthz runs the probe "webhook"):
    # the webhook Service never sends the API server to a pod that cannot answer.
    assert container["readinessProbe"]["httpGet"] == container["livenessProbe"]["httpGet"]
    assert container["resources"]["limits"]["memory"] == "1Gi"

    metrics = one(default_objs, "Service", "bmad-operator-metrics")
    selector = metrics["spec"]["selector"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(8081, "metrics")]


def test_operator_runs_two_replicas_with_leader_election(
    default_objs: list[Obj], operator_deployment: Obj
) -> None:
    """Issue 15: 2 replicas, a Lease, a PodDisruptionBudget, anti-affinity, readiness."""
    spec = operator_deployment["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["BMAD_OPERATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"

    budget = one(default_objs, "PodDisruptionBudget", "bmad-operator")
    assert budget["metadata"]["namespace"] == "bmad-system"
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_leader_election_role_is_one_lease_in_the_operators_namespace(
    default_objs: list[Obj],
) -> None:
    role = one(default_objs, "Role", "bmad-operator-leader-election")
    assert role["metadata"]["namespace"] == settings.OperatorSettings().system_namespace
    lease = settings.OperatorSettings().lease_name
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    binding = one(default_objs, "RoleBinding", "bmad-operator-leader-election")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["roleRef"]["name"] == "bmad-operator-leader-election"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "bmad-operator", "namespace": "bmad-system"}
    ]


def test_service_monitor_selects_the_metrics_service(default_objs: list[Obj]) -> None:
    (monitor,) = kustomize(MANIFESTS / "monitoring")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(default_objs, "Service", "bmad-operator-metrics")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_one_sample_per_bmad_role(sample_objs: list[Obj]) -> None:
    agents = [o for o in sample_objs if o["kind"] == "Agent"]
    assert sorted(o["spec"]["role"] for o in agents) == sorted(BMAD_ROLES)
    assert {o["metadata"]["namespace"] for o in agents} == {"bmad-demo"}
    one(sample_objs, "Namespace", "bmad-demo")


@pytest.mark.parametrize("role", BMAD_ROLES)
def test_sample_agent_is_valid(role: str) -> None:
    path = SAMPLES / f"agent-{role}.yaml"
    doc = yaml.safe_load(path.read_text())
    assert "namespace" not in doc["metadata"], "samples take their namespace from kustomize"
    spec = agent.AgentSpec.model_validate(doc["spec"])
    assert spec.role == role
    assert spec.model.provider == "echo", "samples must run without credentials"
    assert spec.replicas == 1
    assert spec.persona is not None
    assert spec.persona.name
    assert spec.instructions
    parsed = agent.Agent.model_validate(doc)
    assert parsed.api_version == common.API_VERSION
    assert common.is_dns1123_label(doc["metadata"]["name"], max_length=agent.NAME_MAX_LENGTH)


def test_the_shipped_price_table_parses_and_is_mounted_where_the_operator_reads_it(
    default_objs: list[Obj], operator_deployment: Obj
) -> None:
    """Issue 14: the ConfigMap bmad-prices parses into the ledger's price table, and the
    Deployment mounts it at BMAD_OPERATOR_PRICES_FILE (a directory mount, so a changed
    ConfigMap reaches the file), which the operator's settings accept."""
    configmap = one(default_objs, "ConfigMap", "bmad-prices")
    assert configmap["metadata"]["namespace"] == "bmad-system"
    table = usage_prices.parse_yaml(configmap["data"]["prices.yaml"])
    assert table.currency == "USD"
    gpt = table.price("openai", "gpt-4o")
    assert gpt is not None
    assert (gpt.input_per_1m, gpt.output_per_1m, gpt.currency) == (
        decimal.Decimal("2.50"),
        decimal.Decimal("10.00"),
        "USD",
    )
    sonnet = table.price("anthropic", "claude-sonnet-4-5")  # a prefix entry
    assert sonnet is not None
    assert usage_prices.cost(sonnet, tokens_in=1_000_000, tokens_out=100_000) == decimal.Decimal(
        "4.5"
    )
    echo = table.price("echo", "echo-1")
    assert echo is not None
    assert echo.input_per_1m == echo.output_per_1m == 0
    assert table.price("openai-compatible", "anything") is None  # metered, cost unknown

    pod = operator_deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    path = Path(env["BMAD_OPERATOR_PRICES_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "bmad-prices"
    assert path.name in configmap["data"]
    assert settings.OperatorSettings(prices_file=str(path)).prices_file == str(path)
