"""Pure builders of everything an Agent owns: spec in, manifests out.

No I/O here: the reconciler hands in the Agent (and, later, what it binds) and applies
whatever comes back with server-side apply. Golden-file tests pin the output.
Quantities and defaults are written in the canonical form the API server stores, so
that comparing a built object with the live one does not see drift where there is none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import integration as integration_builders
from bmad_operator.builders import meta

Obj = dict[str, Any]

KIND = "Agent"
ROLE_LABEL = "bmad.dev/role"
CONFIG_HASH = "bmad.dev/config-hash"
HTTP_PORT = 8080
CONFIG_DIR = "/etc/bmad"
BINDING_ROOT = "/bindings"
RUNTIME_UID = 10001
DEFAULT_RESOURCES: Obj = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"memory": "512Mi"},
}


def selector_labels(name: str) -> dict[str, str]:
    return {meta.AGENT_LABEL: name}


def selector_string(name: str) -> str:
    return f"{meta.AGENT_LABEL}={name}"


def labels(name: str, role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "bmad-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": role,
        **meta.managed_labels(),
        meta.AGENT_LABEL: name,
        ROLE_LABEL: role,
    }


def _meta(body: Mapping[str, Any], name: str, role: str) -> Obj:
    return meta.object_meta(
        name,
        body["metadata"]["namespace"],
        labels=labels(body["metadata"]["name"], role),
        owner_kind=KIND,
        owner=body,
    )


def config_map_name(agent: str) -> str:
    return f"{agent}-config"


def binding_volume_name(integration: str) -> str:
    """A DNS label unique per integration: long names keep a prefix and gain a hash."""
    name = f"binding-{integration}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(integration.encode()).hexdigest()[:10]
    return f"binding-{integration[:43].rstrip('-')}-{digest}"


def service_account_name(name: str, spec: agent_api.AgentSpec) -> str:
    if spec.runtime and spec.runtime.service_account_name:
        return spec.runtime.service_account_name
    return name


def rendered_config(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj:
    """What the runtime reads at start: everything about the agent but credentials."""
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {
        "apiVersion": meta.API_VERSION,
        "kind": "AgentConfig",
        "agent": body["metadata"]["name"],
        "namespace": body["metadata"]["namespace"],
        "role": dumped["role"],
        "persona": dumped.get("persona", {}),
        "instructions": dumped.get("instructions", ""),
        "instructionsFrom": dumped.get("instructionsFrom"),
        "model": dumped["model"],
        "limits": dumped.get("limits", {}),
        "memory": dumped.get("memory", {}),
        "integrations": dumped.get("integrations", []),
        "bindingRoot": BINDING_ROOT,
    }


def config_map(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj:
    name = body["metadata"]["name"]
    text = json.dumps(rendered_config(body, spec), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(body, config_map_name(name), spec.role),
        "data": {"agent.json": text},
    }


def config_hash(config: Mapping[str, Any], secret_versions: Mapping[str, str]) -> str:
    """Changes whenever the rendered config or a bound Secret changes: rolls the pods."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.get("data", {}), sort_keys=True).encode())
    for name in sorted(secret_versions):
        digest.update(f"\0{name}={secret_versions[name]}".encode())
    return digest.hexdigest()[:16]


def service_account(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj | None:
    if spec.runtime and spec.runtime.service_account_name:
        return None  # the user brings their own
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(body, name, spec.role),
        "automountServiceAccountToken": False,
    }


def memory_store(spec: agent_api.AgentSpec) -> agent_api.MemoryStore:
    return spec.memory.store if spec.memory else agent_api.DEFAULT_MEMORY_STORE


def _env(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> list[Obj]:
    agent = body["metadata"]
    env: list[Obj] = [
        {"name": "BMAD_AGENT_NAME", "value": agent["name"]},
        {"name": "BMAD_AGENT_NAMESPACE", "value": agent["namespace"]},
        {"name": "BMAD_AGENT_ROLE", "value": spec.role},
        {"name": "BMAD_AGENT_CONFIG", "value": f"{CONFIG_DIR}/agent.json"},
        {"name": "SERVICE_BINDING_ROOT", "value": BINDING_ROOT},
        {"name": "BMAD_HTTP_PORT", "value": str(HTTP_PORT)},
        {"name": "BMAD_MEMORY_STORE", "value": memory_store(spec)},
    ]
    ours = {e["name"] for e in env}
    for var in spec.runtime.env if spec.runtime and spec.runtime.env else []:
        if var.name in ours:
            continue
        item = var.model_dump(mode="json", by_alias=True, exclude_none=True)
        env.append(item)
    return env


def _resources(spec: agent_api.AgentSpec) -> Obj:
    if spec.resources is None:
        return {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    dumped: Obj = spec.resources.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {k: {r: str(q) for r, q in v.items()} for k, v in dumped.items() if v}


def deployment(
    body: Mapping[str, Any],
    spec: agent_api.AgentSpec,
    *,
    image: str,
    replicas: int,
    config_digest: str,
    bindings: Sequence[str] = (),
) -> Obj:
    name = body["metadata"]["name"]
    container: Obj = {
        "name": "agent",
        "image": (spec.runtime.image if spec.runtime and spec.runtime.image else image),
        "args": ["runtime"],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": _env(body, spec),
        "resources": _resources(spec),
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http", "scheme": "HTTP"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "successThreshold": 1,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "successThreshold": 1,
            "failureThreshold": 6,
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "successThreshold": 1,
            "failureThreshold": 60,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the pod's own emptyDir
        ],
    }
    if spec.runtime and spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    volumes: list[Obj] = [
        {"name": "config", "configMap": {"name": config_map_name(name), "defaultMode": 0o444}},
        {"name": "tmp", "emptyDir": {}},
    ]
    for integration in bindings:
        vol = binding_volume_name(integration)
        volumes.append(
            {
                "name": vol,
                "secret": {
                    "secretName": integration_builders.binding_secret_name(integration),
                    "defaultMode": 0o440,
                },
            }
        )
        container["volumeMounts"].append(
            {"name": vol, "mountPath": f"{BINDING_ROOT}/{integration}", "readOnly": True}
        )
    pod_labels = labels(name, spec.role)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(body, name, spec.role),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {CONFIG_HASH: config_digest},
                },
                "spec": {
                    "serviceAccountName": service_account_name(name, spec),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUNTIME_UID,
                        "runAsGroup": RUNTIME_UID,
                        "fsGroup": RUNTIME_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def service(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(body, name, spec.role),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(body, name, spec.role),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def endpoint(body: Mapping[str, Any]) -> str:
    agent = body["metadata"]
    return f"http://{agent['name']}.{agent['namespace']}.svc:80"


def desired_replicas(spec: agent_api.AgentSpec, *, suspended: bool = False) -> int:
    return 0 if spec.paused or suspended else spec.replicas


def build_all(
    body: Mapping[str, Any],
    spec: agent_api.AgentSpec,
    *,
    image: str,
    secret_versions: Mapping[str, str] | None = None,
    bindings: Sequence[str] = (),
    suspended: bool = False,
) -> list[Obj]:
    """Every owned object, in the order they should be applied.

    `suspended`: the agent's tenant is suspended, so it runs no replicas.
    """
    config = config_map(body, spec)
    digest = config_hash(config, secret_versions or {})
    objs: list[Obj] = []
    sa = service_account(body, spec)
    if sa is not None:
        objs.append(sa)
    objs.append(config)
    objs.append(
        deployment(
            body,
            spec,
            image=image,
            replicas=desired_replicas(spec, suspended=suspended),
            config_digest=digest,
            bindings=bindings,
        )
    )
    objs.append(service(body, spec))
    objs.append(pod_disruption_budget(body, spec))
    return objs
