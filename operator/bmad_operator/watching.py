"""Which events wake which reconciler: declared by each reconciler, next to its reconcile.

The idea is kubebuilder's `SetupWithManager`: a controller says `For(Agent)` (its own
kind), `Owns(Deployment)` (what it creates, found by label) and `Watches(Secret, map)`
(anything else, with a function from the event to the keys to queue). Here each
reconciler's `watches()` returns such declarations; the controller only routes every
watch event through them to the reconciler's work queue. Mapping functions read the
operator's store (already updated with the event), never the API server.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from bmad_operator import store

Key = tuple[str, str]  # (namespace, name); cluster-scoped kinds have namespace ""


class WatchEvent(NamedTuple):
    """One watch event (kopf's or an informer's), with what the declarations select on."""

    type: str | None  # ADDED, MODIFIED, DELETED; None for objects of the initial listing
    kind: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    body: Mapping[str, Any]

    @property
    def deleted(self) -> bool:
        return self.type == "DELETED"

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


class Request(NamedTuple):
    """What to do with one key of a reconciler's queue."""

    key: Key
    delay: float = 0.0  # seconds; 0 queues at once
    forget: bool = False  # drop the key's pending retries and timers instead of queueing


Mapper = Callable[[WatchEvent], Iterable[Request]]


class Sink(Protocol):
    """Where requests go: a reconciler's work queue, or anything that takes keys alike
    (the autoscaler tracks the Agents it scales this way)."""

    def add(self, key: Hashable) -> None: ...

    def add_after(self, key: Hashable, delay: float) -> None: ...

    def forget(self, key: Hashable) -> None: ...


class Watch(NamedTuple):
    kind: str
    map: Mapper


# What a reconciler's own kind does on deletion (`primary(..., on_delete=...)`).
OnDelete = Literal["queue", "forget", "forget-and-queue"]
QUEUE: OnDelete = "queue"  # queued like any change: its reconcile cleans up
FORGET: OnDelete = "forget"  # nothing left to do: drop its retries and timers
FORGET_AND_QUEUE: OnDelete = "forget-and-queue"  # both: retries go, one last pass runs


def parse(raw: Mapping[str, Any]) -> WatchEvent | None:
    """The event kopf hands us, or None when it names no object."""
    obj = raw.get("object") or {}
    kind = obj.get("kind")
    metadata = obj.get("metadata") or {}
    if not kind or "name" not in metadata:
        return None
    return WatchEvent(
        type=raw.get("type"),
        kind=str(kind),
        namespace=metadata.get("namespace") or "",
        name=str(metadata["name"]),
        labels=metadata.get("labels") or {},
        body=obj,
    )


def primary(kind: str, *, on_delete: OnDelete) -> Watch:
    """The reconciler's own kind (`For`): every event queues its key."""

    def own(event: WatchEvent) -> list[Request]:
        if not event.deleted or on_delete == QUEUE:
            return [Request(event.key)]
        if on_delete == FORGET:
            return [Request(event.key, forget=True)]
        return [Request(event.key, forget=True), Request(event.key)]

    return Watch(kind, own)


def owned(
    kind: str, *, owner_kind: str, label: str, cache: store.Store, delay: float = 0.0
) -> Watch:
    """Objects the reconciler creates (`Owns`), found by the `label` naming their owner.

    Only owners the store knows are queued; `delay` gathers a burst of changes (a
    rollout updates a Deployment's status several times a second) into one pass.
    """

    def owner(event: WatchEvent) -> list[Request]:
        name = event.labels.get(label)
        if name and cache.get(owner_kind, event.namespace, name) is not None:
            return [Request((event.namespace, name), delay=delay)]
        return []

    return Watch(kind, owner)


def mapped(kind: str, mapper: Mapper) -> Watch:
    """Any other kind (`Watches`): `mapper` says which keys an event concerns."""
    return Watch(kind, mapper)


def requests(declared: Sequence[Watch], event: WatchEvent) -> list[Request]:
    """Every request the declarations make of `event`, in declaration order."""
    found: list[Request] = []
    for watch in declared:
        if watch.kind == event.kind:
            found.extend(watch.map(event))
    return found


def kinds(declared: Iterable[Watch]) -> set[str]:
    return {watch.kind for watch in declared}
