"""Pure builders of the budget webhook's objects: its configuration and its TLS Secret.

The configuration only sends the API server's requests that could take a tenant over
its budget (matchConditions: a create, or more replicas), and only from tenant
namespaces. With `failurePolicy: Fail`, an operator that is down therefore blocks
growth in tenant namespaces and nothing else: no scale down, delete, label, status
write or finalizer removal ever waits for it. The configuration is owned by the
operator's namespace, so uninstalling (which deletes that namespace) removes it too.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from bmad_operator.builders import meta

Obj = dict[str, Any]

CONFIG_NAME = "bmad-operator"
TLS_SECRET_NAME = "bmad-operator-webhook-tls"  # noqa: S105 - a name, not a secret
BUDGET_PATH = "agent-budget"
SCALE_BUDGET_PATH = "agent-budget-scale"
TIMEOUT_SECONDS = 5

# CEL over the AdmissionReview: only what can raise usage reaches the webhook. A
# missing replicas counts as the CRD's default (1) on an Agent and as 0 on a Scale
# (whose replicas are omitted when zero).
GROWS_AGENT = (
    "request.operation == 'CREATE' || "
    "(has(object.spec) && has(object.spec.replicas) ? object.spec.replicas : 1) > "
    "(has(oldObject.spec) && has(oldObject.spec.replicas) ? oldObject.spec.replicas : 1)"
)
GROWS_SCALE = (
    "(has(object.spec) && has(object.spec.replicas) ? object.spec.replicas : 0) > "
    "(has(oldObject.spec) && has(oldObject.spec.replicas) ? oldObject.spec.replicas : 0)"
)


def configuration(
    ca_pem: bytes,
    *,
    owner: Mapping[str, Any],
    url: str = "",
    service: str = "",
    service_port: int = 443,
    name: str = CONFIG_NAME,
    approvers: tuple[str, str] | None = None,
) -> Obj:
    """The ValidatingWebhookConfiguration: `url` is the webhook server's root, or
    `service` ("namespace/name") when the API server reaches it through a Service;
    `owner` is the operator's Namespace (its deletion deletes the configuration).

    `approvers` (path, match condition): also review Workflow creates and updates that
    name approvers, in every namespace, for approvals their author may not give.
    """

    def client(path: str) -> Obj:
        config: Obj = {"caBundle": base64.b64encode(ca_pem).decode()}
        if service:
            ns, svc = service.split("/", 1)
            config["service"] = {
                "namespace": ns,
                "name": svc,
                "path": f"/{path}",
                "port": service_port,
            }
        else:
            config["url"] = f"{url.rstrip('/')}/{path}"
        return config

    def webhook(hook: str, path: str, resource: str, operations: list[str], grows: str) -> Obj:
        return {
            "name": hook,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            # Fail, not Ignore: the replica budget has no other guard (the agent count
            # has the ResourceQuota too). Only growth is sent here (matchConditions).
            "failurePolicy": "Fail",
            "timeoutSeconds": TIMEOUT_SECONDS,
            "clientConfig": client(path),
            "namespaceSelector": {
                "matchExpressions": [{"key": meta.TENANT_LABEL, "operator": "Exists"}]
            },
            "matchConditions": [{"name": "raises-usage", "expression": grows}],
            "rules": [
                {
                    "apiGroups": ["bmad.dev"],
                    "apiVersions": ["v1alpha1"],
                    "operations": operations,
                    "resources": [resource],
                    "scope": "Namespaced",
                }
            ],
        }

    hooks = [
        webhook("agent-budget.bmad.dev", BUDGET_PATH, "agents", ["CREATE", "UPDATE"], GROWS_AGENT),
        webhook(
            "agent-scale-budget.bmad.dev",
            SCALE_BUDGET_PATH,
            "agents/scale",
            ["UPDATE"],
            GROWS_SCALE,
        ),
    ]
    if approvers is not None:
        path, condition = approvers
        review = webhook(
            "workflow-approvers.bmad.dev", path, "workflows", ["CREATE", "UPDATE"], condition
        )
        del review["namespaceSelector"]  # Workflows anywhere; only those naming approvers
        review["matchConditions"] = [{"name": "names-approvers", "expression": condition}]
        hooks.append(review)
    owner_meta = owner["metadata"]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {
            "name": name,
            "labels": meta.managed_labels(),
            # No controller or blockOwnerDeletion: the namespace only carries it away.
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "name": owner_meta["name"],
                    "uid": owner_meta["uid"],
                }
            ],
        },
        "webhooks": hooks,
    }


def tls_secret(namespace: str, cert_pem: bytes, key_pem: bytes) -> Obj:
    """The webhook's serving certificate and key. The certificate is self-signed, so
    it is its own CA: `ca.crt` is what the configuration's caBundle holds."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": TLS_SECRET_NAME,
            "namespace": namespace,
            "labels": {**meta.managed_labels(), meta.COMPONENT_LABEL: "webhook"},
        },
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(cert_pem), "tls.key": b64(key_pem), "ca.crt": b64(cert_pem)},
    }
