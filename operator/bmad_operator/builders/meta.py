"""The metadata every object the operator makes carries: who manages it, who owns it.

One place for the label keys the operator writes and the watches select on, the
managed-by label, and owner references, so every builder stamps them the same way
and the controller recognises its own objects by the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bmad_crds.v1alpha1 import common

Obj = dict[str, Any]

API_VERSION = common.API_VERSION
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "bmad-operator"
COMPONENT_LABEL = "app.kubernetes.io/component"
AGENT_LABEL = "bmad.dev/agent"
TENANT_LABEL = "bmad.dev/tenant"
INTEGRATION_LABEL = "bmad.dev/integration"
# On a namespace the operator created for a tenant (never on one it adopted): only
# such a namespace is deleted with `deletionPolicy: Delete`.
CREATED_FOR_TENANT_ANNOTATION = "bmad.dev/created-for-tenant"


def managed_labels() -> dict[str, str]:
    """The label that marks an object as ours (the watches select on it)."""
    return {MANAGED_BY_LABEL: MANAGED_BY}


def is_managed(labels: Mapping[str, str] | None) -> bool:
    return (labels or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def owner_reference(kind: str, owner: Mapping[str, Any]) -> Obj:
    """A controller reference to `owner` (one of our kinds): the garbage collector
    deletes the object with its owner, and only one controller may claim it."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(
    name: str,
    namespace: str,
    *,
    labels: Mapping[str, str],
    owner_kind: str | None = None,
    owner: Mapping[str, Any] | None = None,
) -> Obj:
    """`metadata` of an owned object; `labels` must already hold `managed_labels()`."""
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None and owner_kind is not None:
        meta["ownerReferences"] = [owner_reference(owner_kind, owner)]
    return meta
