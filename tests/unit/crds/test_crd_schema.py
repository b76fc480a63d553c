"""The generated schemas are structural, documented and cheap enough for CEL.

These walk every node of every CRD schema, so a new field cannot slip in without a
description, with a construct the API server refuses, or with a CEL rule that names
a field that does not exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from bmad_crds import generate

pytestmark = pytest.mark.unit

FORBIDDEN_KEYWORDS = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"}


def _schemas() -> list[tuple[str, dict[str, Any]]]:
    return [
        (crd["spec"]["names"]["kind"], crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        for crd in generate.build_crds()
    ]


SCHEMAS = _schemas()
IDS = [kind for kind, _ in SCHEMAS]


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node, with a readable path."""
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_every_property_has_a_description(kind: str, schema: dict[str, Any]) -> None:
    missing = [
        path
        for path, node in generate.walk_properties(schema)
        if path != "metadata" and not node.get("description")
    ]
    assert not missing, f"{kind}: properties without a description: {missing}"
    assert schema["description"]


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_no_json_schema_constructs_a_crd_refuses(kind: str, schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        found = FORBIDDEN_KEYWORDS & set(node)
        assert not found, f"{kind} {path}: {found}"
        assert node.get("type") != "null", f"{kind} {path}"
        assert node.get("additionalProperties") not in (True, False), f"{kind} {path}"
        assert not ("properties" in node and "additionalProperties" in node), f"{kind} {path}"


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_every_node_is_typed_or_an_allowed_exception(kind: str, schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, f"{kind} {path}: int-or-string has no type"
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, (
            f"{kind} {path}: untyped"
        )
        if node["type"] == "array":
            assert "items" in node, f"{kind} {path}"


def test_preserve_unknown_fields_only_on_free_form_maps() -> None:
    found = {
        (kind, path)
        for kind, schema in SCHEMAS
        for path, node in _nodes(schema)
        if node.get("x-kubernetes-preserve-unknown-fields")
    }
    assert found == {("Agent", "spec.model.params"), ("Workflow", "spec.inputs")}
    for kind, schema in SCHEMAS:
        for path, node in _nodes(schema):
            if node.get("x-kubernetes-preserve-unknown-fields"):
                assert node == {
                    "description": node["description"],
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                }, (kind, path)


def test_int_or_string_fields() -> None:
    found = {
        (kind, path)
        for kind, schema in SCHEMAS
        for path, node in _nodes(schema)
        if node.get("x-kubernetes-int-or-string")
    }
    assert ("Agent", "spec.resources.requests{}") in found
    assert ("Agent", "spec.resources.limits{}") in found
    assert ("Tenant", "spec.quota.cpu") in found
    assert ("Tenant", "spec.quota.pods") in found


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_conditions_are_a_map_keyed_by_type(kind: str, schema: dict[str, Any]) -> None:
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) >= {"type", "status", "reason", "lastTransitionTime"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert "observedGeneration" in schema["properties"]["status"]["properties"]


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_list_map_keys_are_required_in_the_items(kind: str, schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            required = node["items"].get("required", [])
            assert set(keys) <= set(required), f"{kind} {path}: map keys must be required"
        if node.get("x-kubernetes-list-type") == "set":
            assert node["items"]["type"] in {"string", "integer", "number"}, f"{kind} {path}"


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_every_list_is_bounded(kind: str, schema: dict[str, Any]) -> None:
    # Unbounded lists make the API server's CEL cost estimates explode.
    for path, node in _nodes(schema):
        if node.get("type") == "array":
            assert "maxItems" in node, f"{kind} {path}: add max_length= to the field"


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_every_spec_string_is_bounded(kind: str, schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema["properties"]["spec"], "spec"):
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, f"{kind} {path}: add max_length="


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_no_defaults_in_status(kind: str, schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema["properties"]["status"], "status"):
        assert "default" not in node, f"{kind} {path}"


def test_defaults_where_the_brief_asks_for_them() -> None:
    schemas = dict(SCHEMAS)
    agent = schemas["Agent"]["properties"]["spec"]["properties"]
    assert agent["replicas"]["default"] == 1
    assert agent["paused"]["default"] is False
    integration = schemas["Integration"]["properties"]["spec"]["properties"]
    assert integration["checkIntervalSeconds"]["default"] == 300
    assert integration["checkIntervalSeconds"]["minimum"] == 10
    tenant = schemas["Tenant"]["properties"]["spec"]["properties"]
    assert tenant["deletionPolicy"]["default"] == "Retain"
    assert tenant["deletionPolicy"]["enum"] == ["Retain", "Delete"]


@pytest.mark.parametrize(("kind", "schema"), SCHEMAS, ids=IDS)
def test_cel_rules_have_messages_and_name_existing_fields(
    kind: str, schema: dict[str, Any]
) -> None:
    for path, node in _nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) <= {"rule", "message", "fieldPath", "reason"}, rule
            assert rule["message"], rule
            assert "\n" not in rule["message"], rule
            names = set(re.findall(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)", rule["rule"]))
            known = set(node.get("properties", {})) | ({"metadata"} if path == "<root>" else set())
            assert names <= known, f"{kind} {path}: {rule['rule']} names {names - known}"
            if "fieldPath" in rule:
                field = rule["fieldPath"].removeprefix(".")
                assert field in node["properties"], f"{kind} {path}: fieldPath {field}"


def test_rules_where_the_brief_asks_for_them() -> None:
    def rules(schema: dict[str, Any]) -> list[str]:
        return [rule["rule"] for rule in schema.get("x-kubernetes-validations", [])]

    schemas = dict(SCHEMAS)
    agent = schemas["Agent"]
    assert any("self.metadata.name.size() <= 52" in rule for rule in rules(agent))
    spec = agent["properties"]["spec"]
    assert "!(has(self.instructions) && has(self.instructionsFrom))" in rules(spec)
    autoscaling = spec["properties"]["autoscaling"]
    assert any("self.minReplicas <= self.maxReplicas" in rule for rule in rules(autoscaling))
    integration = schemas["Integration"]["properties"]["spec"]
    for type_ in ("postgres", "redis", "objectStorage", "stripe", "auth0", "email", "llm"):
        assert f"self.type != '{type_}' || has(self.{type_})" in rules(integration)
    assert any(".filter(x, x).size() <= 1" in rule for rule in rules(integration))
