"""Example objects of every kind, valid by construction, for tests, docs and demos.

They use the deterministic ``echo`` model provider, so they run without any LLM
account. Each function returns a fresh plain dict in the Kubernetes spelling, ready to
be parsed with the models, dumped to YAML or sent to the API server.
"""

from __future__ import annotations

import copy
from typing import Any

from bmad_crds.v1alpha1 import agent, common, integration

# The persona BMAD gives each role: (name, title, focus).
_PERSONAS: dict[agent.Role, tuple[str, str, str]] = {
    "analyst": ("Mary", "Business Analyst", "market research, brainstorming, project briefs"),
    "pm": ("John", "Product Manager", "product requirements documents, epics and stories"),
    "architect": ("Winston", "Architect", "system design, technology choices, architecture docs"),
    "ux-expert": ("Sally", "UX Expert", "user experience, UI specifications, front-end prompts"),
    "po": ("Sarah", "Product Owner", "backlog quality, document alignment, story refinement"),
    "sm": ("Bob", "Scrum Master", "story preparation and hand-off to developers"),
    "dev": ("James", "Full Stack Developer", "implementing stories with tests"),
    "qa": ("Quinn", "Test Architect", "test strategy, reviews, quality gates"),
    "bmad-master": ("BMad Master", "Master Task Executor", "running any BMAD task or template"),
    "bmad-orchestrator": ("BMad Orchestrator", "Orchestrator", "coordinating the other agents"),
    "custom": ("Custom", "Custom Agent", "whatever its instructions say"),
}


def _object(kind: str, name: str, spec: dict[str, Any], namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": common.API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def agent_spec(role: agent.Role) -> dict[str, Any]:
    """A small, valid Agent spec for a BMAD role (echo model, one replica)."""
    name, title, focus = _PERSONAS[role]
    spec: dict[str, Any] = {
        "role": role,
        "persona": {"name": name, "title": title, "focus": focus},
        "model": {"provider": "echo", "name": "echo-1"},
        "replicas": 1,
    }
    if role == "custom":
        spec["instructions"] = "Answer every request with a short, friendly summary."
    return spec


def agent_object(
    role: agent.Role, *, name: str | None = None, namespace: str | None = "default"
) -> dict[str, Any]:
    """A whole Agent object for a role, named after the role unless told otherwise."""
    return _object("Agent", name or role, agent_spec(role), namespace)


def full_agent_spec() -> dict[str, Any]:
    """An Agent spec that sets every field, to exercise the whole schema."""
    return {
        "role": "dev",
        "persona": {
            "name": "James",
            "title": "Full Stack Developer",
            "style": "precise, pragmatic, test-first",
            "identity": "Expert senior engineer who implements stories with tests.",
            "focus": "implementing stories with tests",
        },
        "instructionsFrom": {"name": "dev-instructions", "key": "instructions.md"},
        "model": {
            "provider": "openai-compatible",
            "name": "llama-3.1-70b",
            "integration": "local-llm",
            "params": {"temperature": 0.2, "maxTokens": 4096, "stop": ["\n\n"]},
            "contextWindow": 131072,
            "fallbacks": [
                {"provider": "anthropic", "name": "claude-sonnet-4-5", "integration": "anthropic"},
                {"provider": "echo", "name": "echo-1"},
            ],
        },
        "integrations": ["postgres", "redis", "artifacts"],
        "replicas": 2,
        "autoscaling": {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 10,
            "metrics": [
                {"type": "queueDepth", "target": 5},
                {"type": "inflight", "target": 2.5},
                {
                    "type": "promql",
                    "target": 100,
                    "query": 'sum(rate(bmad_tokens_total{agent="dev"}[1m]))',
                },
            ],
            "scaleToZero": True,
            "scaleUpStabilizationWindowSeconds": 0,
            "scaleDownStabilizationWindowSeconds": 300,
            "pollingIntervalSeconds": 15,
        },
        "limits": {"requestsPerMinute": 600, "tokensPerMinute": 200000, "concurrency": 4},
        "memory": {"turns": 50, "ttlSeconds": 3600},
        "resources": {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"memory": "1Gi", "cpu": 2},
        },
        "runtime": {
            "image": "ghcr.io/example/bmad-runtime:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "env": [
                {"name": "LOG_LEVEL", "value": "debug"},
                {
                    "name": "EXTRA_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "extra", "key": "token"}},
                },
                {
                    "name": "FEATURES",
                    "valueFrom": {"configMapKeyRef": {"name": "features", "key": "list"}},
                },
            ],
            "serviceAccountName": "dev-agent",
        },
        "paused": False,
    }


def integration_spec(type_: integration.IntegrationType) -> dict[str, Any]:
    """A valid Integration spec of a type, pointing at loopback test services."""
    specs: dict[integration.IntegrationType, dict[str, Any]] = {
        "postgres": {
            "secretRef": {"name": "postgres-credentials"},
            "postgres": {"host": "127.0.0.1", "port": 5432, "database": "bmad"},
        },
        "redis": {"redis": {"host": "127.0.0.1", "port": 6379}},
        "objectStorage": {
            "secretRef": {"name": "minio-credentials"},
            "objectStorage": {
                "provider": "minio",
                "endpoint": "http://127.0.0.1:9000",
                "bucket": "bmad-artifacts",
                "createBucket": True,
                "versioning": True,
                "pathStyle": True,
            },
        },
        "stripe": {
            "secretRef": {"name": "stripe-credentials"},
            "stripe": {"apiBase": "http://127.0.0.1:12111"},
        },
        "auth0": {
            "auth0": {"issuer": "http://127.0.0.1:8443/", "audience": "https://bmad.dev/api"}
        },
        "email": {
            "secretRef": {"name": "smtp-credentials"},
            "email": {
                "provider": "smtp",
                "host": "127.0.0.1",
                "port": 1025,
                "from": "noreply@bmad.dev",
            },
        },
        "llm": {
            "secretRef": {"name": "llm-credentials", "keys": {"apiKey": "OPENAI_API_KEY"}},
            "llm": {
                "provider": "openai-compatible",
                "baseUrl": "http://127.0.0.1:8000/v1",
                "defaultModel": "llama-3.1-70b",
            },
        },
    }
    return {"type": type_, **copy.deepcopy(specs[type_])}


def integration_object(
    type_: integration.IntegrationType,
    *,
    name: str | None = None,
    namespace: str | None = "default",
) -> dict[str, Any]:
    """A whole Integration object of a type, named after the type unless told otherwise."""
    return _object("Integration", name or type_.lower(), integration_spec(type_), namespace)


def workflow_spec() -> dict[str, Any]:
    """A greenfield-style BMAD workflow: brief, PRD, architecture, stories, code."""
    return {
        "artifacts": {"integration": "objectstorage", "prefix": "demo/"},
        "inputs": {"project": "todo-app", "brief": "A to-do app for teams."},
        "steps": [
            {"id": "brief", "agent": "analyst", "creates": "project-brief.md", "optional": True},
            {
                "id": "prd",
                "agent": "pm",
                "creates": "prd.md",
                "requires": ["project-brief.md"],
                "approval": {"required": True, "prompt": "Is the PRD complete?"},
            },
            {
                "id": "ux",
                "agent": "ux-expert",
                "creates": "front-end-spec.md",
                "requires": ["prd.md"],
                "condition": "user_wants_ux",
            },
            {
                "id": "architecture",
                "agent": "architect",
                "creates": "architecture.md",
                "requires": ["prd.md"],
                "retries": {"limit": 2, "backoffSeconds": 30},
                "timeoutSeconds": 1800,
            },
            {
                "id": "stories",
                "agent": "sm",
                "creates": "stories",
                "requires": ["prd.md", "architecture.md"],
                "repeat": {"over": "prd.md", "maxParallel": 2},
            },
            {
                "id": "implement",
                "agent": "dev",
                "requires": ["stories"],
                "repeat": {"over": "stories", "maxParallel": 4},
            },
        ],
    }


def workflow_object(
    *, name: str = "greenfield", namespace: str | None = "default"
) -> dict[str, Any]:
    """A whole Workflow object."""
    return _object("Workflow", name, workflow_spec(), namespace)


def tenant_spec() -> dict[str, Any]:
    """A Tenant with two namespaces, an admin group, quota, budgets and billing."""
    return {
        "displayName": "Acme Corp",
        "namespaces": ["acme", "acme-dev"],
        "admins": [{"kind": "Group", "name": "acme-admins"}, {"kind": "User", "name": "alice"}],
        "quota": {"cpu": "8", "memory": "16Gi", "pods": 50},
        "limits": {"agents": 20, "replicas": 40, "tokensPerMonth": 10000000},
        "billing": {"integration": "stripe", "priceId": "price_123", "email": "billing@acme.test"},
        "deletionPolicy": "Retain",
        "dataRetentionDays": 90,
    }


def tenant_object(*, name: str = "acme") -> dict[str, Any]:
    """A whole Tenant object (cluster-scoped: no namespace)."""
    return _object("Tenant", name, tenant_spec(), None)


def all_objects() -> list[dict[str, Any]]:
    """One object per role, per Integration type, a Workflow and a Tenant."""
    objects = [agent_object(role) for role in agent.ROLES]
    objects.append(_object("Agent", "dev-full", full_agent_spec(), "default"))
    objects.extend(integration_object(type_) for type_ in integration.TYPES)
    objects.append(workflow_object())
    objects.append(tenant_object())
    return objects
