"""Small builders of test objects shared by the operator's integration tests."""

from __future__ import annotations

from typing import Any


def agent(name: str, *, role: str = "dev", replicas: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "role": role,
        "model": {"provider": "echo", "name": "echo-1"},
        # No datastores are bound in these tests: a durable agent would never be ready.
        "memory": {"store": "inProcess"},
        "replicas": replicas,
    }
    body.update(spec)
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": body,
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None
