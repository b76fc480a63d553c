"""What the operator has seen, kept from its watch streams (kopf's and `informer`'s).

Reconciles read from here instead of the API server, so an Agent whose owned
objects are all as they should be costs no request at all. The API server stays the
source of truth: a miss here is confirmed with a GET before anything is created.

Objects are kept without the metadata nothing here reads: `managedFields` (the
field managers' ownership, often a third of a server-side-applied object) and
kubectl's `last-applied-configuration` annotation (a second copy of the spec). At a
thousand Agents those were most of the store (docs/benchmarks.md, bench/reconcile).
The keys and short strings of what is kept are interned: every Deployment repeats the
same few hundred keys and values, which the JSON decoder allocates anew for each
object; shared, they take half the memory.
"""

from __future__ import annotations

import sys
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
        self._objects[kind][key] = slim(obj)

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


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def slim(obj: Mapping[str, Any]) -> Obj:
    """A copy of `obj` without `managedFields` and kubectl's last-applied copy, its
    keys and short strings interned; the caller's object is left as it was."""
    kept: Obj = {}
    for key, value in obj.items():
        if key == "metadata" and isinstance(value, Mapping):
            # One copy: the metadata is filtered and shared in the same pass.
            meta = {sys.intern(k): _shared(v) for k, v in value.items() if k != "managedFields"}
            annotations = meta.get("annotations")
            if isinstance(annotations, dict) and LAST_APPLIED in annotations:
                del annotations[LAST_APPLIED]  # a copy made just above, never the caller's
            kept["metadata"] = meta
        else:
            kept[sys.intern(key) if type(key) is str else key] = _shared(value)
    return kept


_SHORT = 64  # strings up to this length are interned: names, labels, enum values


def _shared(value: Any) -> Any:
    """`value` copied with interned keys and short strings.

    Decoded JSON holds only dicts, lists, strings, numbers, booleans and None: those are
    told apart by their exact type first, without `isinstance` against the `Mapping` ABC
    for every leaf (the ABC check was the costliest part of this walk, which runs on
    every watch event of an owned object)."""
    kind = type(value)
    if kind is str:  # not str subclasses (enums)
        return sys.intern(value) if len(value) <= _SHORT else value
    if kind in _PLAIN:
        return value
    if kind is dict or isinstance(value, Mapping):
        return {sys.intern(k) if type(k) is str else k: _shared(v) for k, v in value.items()}
    if kind is list or isinstance(value, list):
        return [_shared(v) for v in value]
    return value


_PLAIN = frozenset({int, float, bool, type(None)})


def _older(new: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether `new` is an older version than `current` (same uid, lower resourceVersion)."""
    nm, cm = new.get("metadata", {}), current.get("metadata", {})
    if nm.get("uid") != cm.get("uid"):
        return False
    try:
        return int(nm.get("resourceVersion", 0)) < int(cm.get("resourceVersion", 0))
    except (TypeError, ValueError):
        return False
