"""`store.Store`: the operator's view of the cluster, newest version wins.

Watch events and the responses of our own writes arrive in any order; an older
resourceVersion of the same object must not overwrite a newer one, but an object
deleted and recreated under the same name (a new uid) always replaces the old one.
"""

from __future__ import annotations

import enum
import sys
import types
from typing import Any

import pytest

from bmad_operator import store

pytestmark = pytest.mark.unit


def obj(
    rv: str | None,
    *,
    uid: str = "uid-1",
    name: str = "mary",
    ns: str | None = "team-a",
    **extra: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid}
    if ns is not None:
        meta["namespace"] = ns
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"kind": "Agent", "metadata": meta, **extra}


def _rv(cache: store.Store, name: str = "mary") -> str:
    got = cache.get("Agent", "team-a", name)
    assert got is not None
    rv: str = got["metadata"]["resourceVersion"]
    return rv


def test_newer_version_replaces_older() -> None:
    cache = store.Store()
    cache.put(obj("10"))
    cache.put(obj("11"))
    assert _rv(cache) == "11"


def test_older_version_of_the_same_uid_does_not_replace_a_newer_one() -> None:
    cache = store.Store()
    cache.put(obj("11", spec={"v": "new"}))
    cache.put(obj("10", spec={"v": "old"}))
    got = cache.get("Agent", "team-a", "mary")
    assert got is not None
    assert got["metadata"]["resourceVersion"] == "11"
    assert got["spec"] == {"v": "new"}


def test_versions_compare_as_numbers_not_strings() -> None:
    cache = store.Store()
    cache.put(obj("100"))
    cache.put(obj("99"))  # "99" > "100" as strings
    assert _rv(cache) == "100"
    cache.put(obj("1000"))
    assert _rv(cache) == "1000"


def test_same_version_replaces() -> None:
    cache = store.Store()
    cache.put(obj("10", spec={"v": 1}))
    cache.put(obj("10", spec={"v": 2}))
    got = cache.get("Agent", "team-a", "mary")
    assert got is not None
    assert got["spec"] == {"v": 2}


def test_recreated_object_with_a_new_uid_replaces_even_with_a_lower_version() -> None:
    cache = store.Store()
    cache.put(obj("500", uid="uid-old"))
    cache.put(obj("20", uid="uid-new"))
    got = cache.get("Agent", "team-a", "mary")
    assert got is not None
    assert got["metadata"]["uid"] == "uid-new"
    assert got["metadata"]["resourceVersion"] == "20"


def test_unparsable_versions_do_not_block_updates() -> None:
    cache = store.Store()
    cache.put(obj("abc"))
    cache.put(obj("5"))
    assert _rv(cache) == "5"
    cache.put(obj(None))
    got = cache.get("Agent", "team-a", "mary")
    assert got is not None


def test_kinds_names_and_namespaces_are_separate() -> None:
    cache = store.Store()
    cache.put(obj("1", name="a"))
    cache.put(obj("1", name="a", ns="team-b"))
    cache.put({"kind": "Deployment", "metadata": {"name": "a", "namespace": "team-a"}})
    cache.put(obj("1", name="cluster-wide", ns=None))
    assert cache.count("Agent") == 3
    assert cache.count("Deployment") == 1
    assert sorted(cache.keys("Agent")) == [("", "cluster-wide"), ("team-a", "a"), ("team-b", "a")]
    assert cache.get("Agent", None, "cluster-wide") is not None
    assert cache.get("Agent", "team-c", "a") is None
    assert cache.get("Secret", "team-a", "a") is None
    assert dict(cache.items("Deployment"))[("team-a", "a")]["kind"] == "Deployment"


def test_remove() -> None:
    cache = store.Store()
    cache.put(obj("1"))
    cache.remove("Agent", "team-a", "mary")
    assert cache.get("Agent", "team-a", "mary") is None
    cache.remove("Agent", "team-a", "mary")  # twice is fine
    cache.remove("Nothing", None, "x")
    # After a delete, an object of the same uid and an older version comes back in.
    cache.put(obj("1"))
    assert _rv(cache) == "1"


def test_put_copies_the_top_level() -> None:
    cache = store.Store()
    original = obj("1", spec={"v": 1})
    cache.put(original)
    original["spec"] = {"v": 2}
    got = cache.get("Agent", "team-a", "mary")
    assert got is not None
    assert got["spec"] == {"v": 1}


def test_items_can_be_iterated_while_the_store_changes() -> None:
    cache = store.Store()
    for i in range(5):
        cache.put(obj("1", name=f"a{i}"))
    seen = []
    for key, _ in cache.items("Agent"):
        seen.append(key)
        cache.put(obj("1", name=f"new-{key[1]}"))
    assert len(seen) == 5
    assert cache.count("Agent") == 10


def test_the_store_keeps_no_managed_fields_nor_last_applied_copy() -> None:
    """What nothing reads is dropped; the rest of the metadata, and the caller's own
    object, are left as they were."""
    cache = store.Store()
    body = obj(
        "7",
        spec={"replicas": 2},
        status={"readyReplicas": 2},
    )
    body["metadata"]["managedFields"] = [{"manager": "bmad-operator", "fieldsV1": {"f:spec": {}}}]
    body["metadata"]["labels"] = {"app": "mary"}
    body["metadata"]["annotations"] = {store.LAST_APPLIED: '{"spec": {}}', "team": "a"}
    cache.put(body)
    kept = cache.get("Agent", "team-a", "mary")
    assert kept is not None
    assert "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"team": "a"}
    assert kept["metadata"]["labels"] == {"app": "mary"}
    assert kept["metadata"]["resourceVersion"] == "7"
    assert kept["spec"] == {"replicas": 2}
    assert kept["status"] == {"readyReplicas": 2}
    # the object handed in is not changed
    assert body["metadata"]["managedFields"][0]["manager"] == "bmad-operator"
    assert store.LAST_APPLIED in body["metadata"]["annotations"]


def test_a_kept_object_is_an_equal_copy_with_short_strings_interned() -> None:
    """Every kind of JSON value, and the Mappings and str subclasses a client may hand in,
    come out equal to what went in; short strings are the interned ones, nested values
    are copies."""

    class Phase(enum.StrEnum):
        READY = "Ready"

    long_text = "x" * 200
    spec = {
        "replicas": 2,
        "ratio": 0.5,
        "paused": False,
        "nothing": None,
        "tags": ["a", "b", {"nested": "c"}],
        "view": types.MappingProxyType({"inner": "value"}),
        "phase": Phase.READY,
        "text": long_text,
    }
    body = obj("7", spec=spec)
    cache = store.Store()
    cache.put(body)
    kept = cache.get("Agent", "team-a", "mary")
    assert kept is not None
    assert kept["spec"] == {**spec, "view": {"inner": "value"}}
    assert type(kept["spec"]["view"]) is dict
    assert kept["spec"]["phase"] is Phase.READY
    assert kept["spec"]["tags"] is not spec["tags"]
    assert kept["spec"]["tags"][2] is not spec["tags"][2]
    assert kept["spec"]["tags"][0] is sys.intern("a")
    assert kept["spec"]["text"] == long_text
