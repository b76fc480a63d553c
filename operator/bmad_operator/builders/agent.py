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

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import integration as integration_builders
from bmad_operator.builders import meta

Obj = dict[str, Any]

KIND = "Agent"
ROLE_LABEL = "bmad.dev/role"
CONFIG_HASH = "bmad.dev/config-hash"
HTTP_PORT = contract.HTTP_PORT
CONFIG_DIR = contract.CONFIG_DIR
BINDING_ROOT = contract.BINDING_ROOT
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


def writable_volume_name(path: str) -> str:
    return path.strip("/").replace("/", "-")


def config_volume(name: str, spec: agent_api.AgentSpec) -> Obj:
    """agent.json, and next to it the key spec.instructionsFrom names.

    The user's ConfigMap is not optional: a pod never starts without its instructions
    (the reconciler says on the Agent when the ConfigMap or the key is missing).
    """
    ref = spec.instructions_from
    if ref is None:
        return {
            "name": "config",
            "configMap": {"name": config_map_name(name), "defaultMode": 0o444},
        }
    return {
        "name": "config",
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"configMap": {"name": config_map_name(name)}},
                {
                    "configMap": {
                        "name": ref.name,
                        "items": [{"key": ref.key, "path": contract.INSTRUCTIONS_FILE}],
                        "optional": False,
                    }
                },
            ],
        },
    }


def service_account_name(name: str, spec: agent_api.AgentSpec) -> str:
    if spec.runtime and spec.runtime.service_account_name:
        return spec.runtime.service_account_name
    return name


def rendered_config(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj:
    """What the runtime reads at start (agent.json): what the agent does, no credentials."""
    agent = body["metadata"]
    return contract.agent_config(
        agent=agent["name"], namespace=agent["namespace"], spec=spec
    ).rendered()


def config_map(body: Mapping[str, Any], spec: agent_api.AgentSpec) -> Obj:
    name = body["metadata"]["name"]
    text = json.dumps(rendered_config(body, spec), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(body, config_map_name(name), spec.role),
        "data": {"agent.json": text},
    }


def config_hash(
    config: Mapping[str, Any],
    secret_versions: Mapping[str, str],
    *,
    instructions_version: str | None = None,
) -> str:
    """Changes whenever the rendered config, a bound Secret or the ConfigMap of
    spec.instructionsFrom changes: rolls the pods."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.get("data", {}), sort_keys=True).encode())
    for name in sorted(secret_versions):
        digest.update(f"\0{name}={secret_versions[name]}".encode())
    if instructions_version is not None:
        digest.update(f"\0\0instructions={instructions_version}".encode())
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


def auth_mode(spec: agent_api.AgentSpec) -> agent_api.AuthMode:
    return spec.auth.mode if spec.auth else agent_api.DEFAULT_AUTH_MODE


def tenant_of(body: Mapping[str, Any], tenant: str | None) -> str:
    """The tenant the runtime serves: the namespace's Tenant, else the namespace."""
    return tenant or str(body["metadata"]["namespace"])


def split_reserved_env(raw_spec: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The spec without the names in spec.runtime.env that are the operator's (any
    case), and those names.

    The API server refuses them (a CEL rule, and `agent_api.EnvVar`'s model the same),
    so only an Agent stored before that rule still has them: it is reconciled without
    them (and told so) rather than left running with a forged identity.
    """
    runtime = raw_spec.get("runtime")
    if not isinstance(runtime, Mapping):
        return dict(raw_spec), []
    env = runtime.get("env")
    if not isinstance(env, list):
        return dict(raw_spec), []
    reserved = [
        str(var["name"])
        for var in env
        if isinstance(var, Mapping)
        and isinstance(var.get("name"), str)
        and contract.is_reserved_env(var["name"])
    ]
    if not reserved:
        return dict(raw_spec), []
    kept = [var for var in env if not (isinstance(var, Mapping) and var.get("name") in reserved)]
    return {**raw_spec, "runtime": {**runtime, "env": kept}}, reserved


def _env(
    body: Mapping[str, Any],
    spec: agent_api.AgentSpec,
    *,
    tenant: str | None,
    usage_ledger_url: str | None = None,
    usage_spool: bool = True,
) -> list[Obj]:
    agent = body["metadata"]
    env: list[Obj] = list(
        contract.PodEnvironment(
            agent_name=agent["name"],
            agent_namespace=agent["namespace"],
            agent_role=spec.role,
            tenant=tenant_of(body, tenant),
            memory_store=memory_store(spec),
            auth_mode=auth_mode(spec),
            usage_ledger_url=usage_ledger_url,
            usage_spool=usage_spool,
        ).env()
    )
    for var in spec.runtime.env if spec.runtime and spec.runtime.env else []:
        if contract.is_reserved_env(var.name):
            continue
        item = var.model_dump(mode="json", by_alias=True, exclude_none=True)
        env.append(item)
    return env


def usage_secret(body: Mapping[str, Any], spec: agent_api.AgentSpec, password: str) -> Obj:
    """The Secret of the agent's ledger writer password (owned by the Agent)."""
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(body, contract.usage_secret_name(name), spec.role),
        "type": "Opaque",
        "stringData": {contract.USAGE_SECRET_KEY: password},
    }


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
    tenant: str | None = None,
    usage_ledger_url: str | None = None,
    usage_spool: bool = True,
) -> Obj:
    """`tenant`: the Tenant owning the Agent's namespace (None: the namespace).
    `usage_ledger_url`: the platform ledger's Redis when the operator meters usage;
    `usage_spool`: whether the runtime keeps its records in a spool (docs/billing.md)."""
    name = body["metadata"]["name"]
    container: Obj = {
        "name": "agent",
        "image": (spec.runtime.image if spec.runtime and spec.runtime.image else image),
        "args": ["runtime"],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": _env(
            body, spec, tenant=tenant, usage_ledger_url=usage_ledger_url, usage_spool=usage_spool
        ),
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
            *(
                {"name": writable_volume_name(path), "mountPath": path}
                for path in contract.WRITABLE_DIRS
            ),
        ],
    }
    if spec.runtime and spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    volumes: list[Obj] = [
        config_volume(name, spec),
        *({"name": writable_volume_name(path), "emptyDir": {}} for path in contract.WRITABLE_DIRS),
    ]
    if usage_ledger_url and usage_spool:
        # The usage spool: memory, the pod's own, kept across restarts of the container.
        volumes.append(
            {
                "name": contract.USAGE_SPOOL_VOLUME,
                "emptyDir": {"medium": "Memory", "sizeLimit": contract.USAGE_SPOOL_SIZE_LIMIT},
            }
        )
        container["volumeMounts"].append(
            {"name": contract.USAGE_SPOOL_VOLUME, "mountPath": contract.USAGE_SPOOL_DIR}
        )
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
    tenant: str | None = None,
    instructions_version: str | None = None,
    usage_ledger_url: str | None = None,
    usage_spool: bool = True,
) -> list[Obj]:
    """Every owned object, in the order they should be applied.

    `suspended`: the agent's tenant is suspended, so it runs no replicas. `tenant`: the
    Tenant owning the namespace (None: none does). `instructions_version`: the
    resourceVersion of spec.instructionsFrom's ConfigMap (a change rolls the pods).
    """
    config = config_map(body, spec)
    digest = config_hash(config, secret_versions or {}, instructions_version=instructions_version)
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
            tenant=tenant,
            usage_ledger_url=usage_ledger_url,
            usage_spool=usage_spool,
        )
    )
    objs.append(service(body, spec))
    objs.append(pod_disruption_budget(body, spec))
    return objs
