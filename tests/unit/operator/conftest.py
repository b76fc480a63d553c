"""Shared fixtures of the operator's unit tests: Agent bodies as the API server stores them.

A body is what the reconciler reads from its store: the raw object with metadata
(name, namespace, uid, generation, resourceVersion) and an unparsed spec. Builders
take the body for its metadata and the parsed `AgentSpec` for everything else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import agent as builders

Obj = dict[str, Any]

NAMESPACE = "team-a"
AGENT_UID = "6f1c2a1e-0d4b-4c0e-9a57-1f0c3b5d7e01"
RUNTIME_IMAGE = "ghcr.io/bmad/agent-runtime:0.1.0"
MINIMAL_SPEC: Obj = {"role": "analyst", "model": {"provider": "echo", "name": "echo-1"}}

MakeBody = Callable[..., Obj]
BuildAgent = Callable[..., list[Obj]]


def agent_body(
    spec: Mapping[str, Any] | None = None,
    *,
    name: str = "mary",
    namespace: str = NAMESPACE,
    uid: str = AGENT_UID,
    generation: int = 1,
    resource_version: str = "1000",
) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": generation,
            "resourceVersion": resource_version,
        },
        "spec": copy.deepcopy(dict(spec if spec is not None else MINIMAL_SPEC)),
    }


def build_agent(
    spec: Mapping[str, Any] | None = None,
    *,
    image: str = RUNTIME_IMAGE,
    bindings: tuple[str, ...] | list[str] = (),
    secret_versions: Mapping[str, str] | None = None,
    **body_kw: Any,
) -> list[Obj]:
    body = agent_body(spec, **body_kw)
    return builders.build_all(
        body,
        agent_api.AgentSpec.model_validate(body["spec"]),
        image=image,
        bindings=bindings,
        secret_versions=secret_versions,
    )


@pytest.fixture
def make_body() -> MakeBody:
    """A factory of Agent bodies: `make_body(spec, name=..., generation=...)`."""
    return agent_body


@pytest.fixture
def build_agent_objects() -> BuildAgent:
    """`build(spec, bindings=..., secret_versions=..., image=...)`: every owned object."""
    return build_agent
