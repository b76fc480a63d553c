"""What the operator has seen, kept from kopf's watch streams.

Reconciles read from here instead of the API server, so an Agent whose owned
objects are all as they should be costs no request at all. The API server stays the
source of truth: a miss here is confirmed with a GET before anything is created.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)


class Store:
    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, Obj]] = {}

    def put(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata", {})
        kind = str(obj.get("kind"))
        key = (meta.get("namespace") or "", meta["name"])
        current = self._objects.setdefault(kind, {}).get(key)
        # Watch events and our own apply responses race: keep the newer one.
        if current is not None and _older(obj, current):
            return
        self._objects[kind][key] = dict(obj)

    def remove(self, kind: str, namespace: str | None, name: str) -> None:
        self._objects.get(kind, {}).pop((namespace or "", name), None)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        return self._objects.get(kind, {}).get((namespace or "", name))

    def keys(self, kind: str) -> list[Key]:
        return list(self._objects.get(kind, {}))

    def items(self, kind: str) -> Iterator[tuple[Key, Obj]]:
        yield from list(self._objects.get(kind, {}).items())

    def count(self, kind: str) -> int:
        return len(self._objects.get(kind, {}))


def _older(new: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether `new` is an older version than `current` (same uid, lower resourceVersion)."""
    nm, cm = new.get("metadata", {}), current.get("metadata", {})
    if nm.get("uid") != cm.get("uid"):
        return False
    try:
        return int(nm.get("resourceVersion", 0)) < int(cm.get("resourceVersion", 0))
    except (TypeError, ValueError):
        return False
