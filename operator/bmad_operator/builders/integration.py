"""Pure builders of what an Integration owns: its binding Secret.

The binding Secret `<integration>-binding` holds what a checked Integration tells its
agents, in the servicebinding.io layout (`type`, `provider`, `host`, `uri`, ...);
agents mount it under `$SERVICE_BINDING_ROOT/<integration>/`. Its name is the one
contract between the Integration and the Agent builders, so both take it from here.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from bmad_operator.builders import meta

Obj = dict[str, Any]

KIND = "Integration"


def binding_secret_name(integration: str) -> str:
    return f"{integration}-binding"


def binding_labels(integration: str) -> dict[str, str]:
    return {
        **meta.managed_labels(),
        meta.COMPONENT_LABEL: "binding",
        meta.INTEGRATION_LABEL: integration,
    }


def binding_secret(body: Mapping[str, Any], spec_type: str, data: Mapping[str, str]) -> Obj:
    """The binding Secret of the Integration `body` of type `spec_type`, holding `data`."""
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta.object_meta(
            binding_secret_name(name),
            body["metadata"]["namespace"],
            labels=binding_labels(name),
            owner_kind=KIND,
            owner=body,
        ),
        "type": f"servicebinding.io/{spec_type}",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())},
    }
