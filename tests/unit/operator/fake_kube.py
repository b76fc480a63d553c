"""`FakeKube`: an in-memory API server with the async methods the reconcilers call.

It has the reconcilers' view of `kube.Kube` (get, list, create, apply, apply_new,
patch_status, merge_patch, delete, event), records every call, and behaves like the API
server where it matters to them: apply adds server-side defaults, a uid, a resourceVersion and a
generation, and keeps the status (a ResourceQuota's is counted at once); patch_status
merges into the status; a merge patch that names a stale resourceVersion is refused
with 409; an object being deleted goes away when its last finalizer is removed. Shared
by the reconciler tests of every kind.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from bmad_operator import errors, store

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (kind, namespace or "", name)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, Obj] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.applied: list[Obj] = []
        self.created: list[Obj] = []
        self.statuses: list[Obj] = []
        self.patches: list[tuple[str, str, Obj]] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.events: list[Obj] = []
        self.refuse: dict[str, errors.ApiError] = {}  # kind -> the error apply raises
        self.refuse_delete: dict[str, errors.ApiError] = {}  # kind -> the error delete raises
        self.refuse_events = False
        self._rv = 1000

    # -- test helpers -----------------------------------------------------------------
    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def reset(self) -> None:
        self.calls.clear()
        self.applied.clear()
        self.created.clear()
        self.statuses.clear()
        self.patches.clear()
        self.deleted.clear()
        self.events.clear()

    def verbs(self, verb: str) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[0] == verb]

    def seed(self, obj: Obj, cache: store.Store) -> None:
        """An object that exists on the server and that the watch has delivered."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("resourceVersion", self.next_rv())
        self.objects[(obj["kind"], meta.get("namespace") or "", meta["name"])] = obj
        cache.put(copy.deepcopy(obj))

    def find(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        return self.objects.get((kind, namespace or "", name))

    # -- what kube.Kube offers --------------------------------------------------------
    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        self.calls.append(("get", kind, name))
        found = self.find(kind, namespace, name)
        return copy.deepcopy(found) if found is not None else None

    async def apply(self, obj: Obj) -> Obj:
        kind, meta = obj["kind"], obj["metadata"]
        self.calls.append(("apply", kind, meta["name"]))
        return self._apply(obj)

    async def apply_new(self, obj: Obj) -> Obj:
        """An apply that only creates: 409 Conflict when anything has the name."""
        kind, meta = obj["kind"], obj["metadata"]
        self.calls.append(("apply_new", kind, meta["name"]))
        if self.find(kind, meta.get("namespace"), meta["name"]) is not None:
            raise errors.ApiError(409, "Conflict", f"{kind} {meta['name']!r} exists")
        return self._apply(obj)

    def _apply(self, obj: Obj) -> Obj:
        kind, meta = obj["kind"], obj["metadata"]
        if kind in self.refuse:
            raise self.refuse[kind]
        self.applied.append(copy.deepcopy(obj))
        key = (kind, meta.get("namespace") or "", meta["name"])
        existing = self.objects.get(key)
        live = copy.deepcopy(obj)
        live_meta = live["metadata"]
        live_meta["uid"] = (existing or {"metadata": {}})["metadata"].get(
            "uid", f"uid-{kind}-{meta['name']}"
        )
        live_meta["resourceVersion"] = self.next_rv()
        live_meta["generation"] = existing["metadata"].get("generation", 0) + 1 if existing else 1
        live_meta["creationTimestamp"] = "2025-01-01T00:00:00Z"
        live_meta["managedFields"] = [{"manager": "bmad-operator", "operation": "Apply"}]
        if existing is not None:
            # Apply owns only what it sends: labels others set stay.
            live_meta["labels"] = {
                **(existing["metadata"].get("labels") or {}),
                **(live_meta.get("labels") or {}),
            }
        if kind == "Secret" and "stringData" in live:
            # As the API server does: stringData is written into data, base64-encoded.
            data = live.setdefault("data", {})
            for k, v in live.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()
        if kind == "Deployment":
            live["spec"]["progressDeadlineSeconds"] = 600
            pod = live["spec"]["template"]["spec"]
            pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst")
            for container in pod["containers"]:
                container.setdefault("imagePullPolicy", "IfNotPresent")
                container["terminationMessagePath"] = "/dev/termination-log"
        if kind == "Service":
            live["spec"]["clusterIP"] = "10.96.0.10"
            live["spec"]["sessionAffinity"] = "None"
        if existing is not None and "status" in existing:
            live["status"] = copy.deepcopy(existing["status"])
        if kind == "ResourceQuota":
            # Kubernetes' quota controller counts it (here at once, there a moment later).
            hard = copy.deepcopy(live["spec"]["hard"])
            live["status"] = {"hard": hard, "used": dict.fromkeys(hard, "0")}
        self.objects[key] = live
        return copy.deepcopy(live)

    async def list(self, kind: str, namespace: str | None = None, selector: str = "") -> list[Obj]:
        """Objects of `kind` (in `namespace`), matching a `key=value,...` selector."""
        self.calls.append(("list", kind, namespace or ""))
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        return [
            copy.deepcopy(obj)
            for (k, ns, _), obj in sorted(self.objects.items())
            if k == kind
            and (namespace is None or ns == namespace)
            and all((obj["metadata"].get("labels") or {}).get(a) == b for a, b in wanted.items())
        ]

    async def create(self, obj: Obj) -> Obj:
        """POST: 409 AlreadyExists when the name is taken, like the API server."""
        kind, meta = obj["kind"], obj["metadata"]
        self.calls.append(("create", kind, meta["name"]))
        key = (kind, meta.get("namespace") or "", meta["name"])
        if key in self.objects:
            raise errors.ApiError(409, "AlreadyExists", f"{kind} {meta['name']} already exists")
        self.created.append(copy.deepcopy(obj))
        live = copy.deepcopy(obj)
        live["metadata"].update(
            uid=f"uid-{kind}-{meta['name']}",
            resourceVersion=self.next_rv(),
            generation=1,
            creationTimestamp="2025-01-01T00:00:00Z",
        )
        self.objects[key] = live
        return copy.deepcopy(live)

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Obj) -> Obj:
        self.calls.append(("patch_status", kind, name))
        self.statuses.append(copy.deepcopy(status))
        obj = self._existing(kind, namespace, name)
        # A merge patch, as the API server applies it: nested objects merge, null removes.
        obj["status"] = merge_patch(obj.get("status") or {}, status)
        obj["metadata"]["resourceVersion"] = self.next_rv()
        return copy.deepcopy(obj)

    async def merge_patch(self, kind: str, namespace: str | None, name: str, patch: Obj) -> Obj:
        self.calls.append(("merge_patch", kind, name))
        self.patches.append((kind, name, copy.deepcopy(patch)))
        obj = self._existing(kind, namespace, name)
        wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != obj["metadata"].get("resourceVersion"):
            raise errors.ApiError(409, "Conflict", "the object has been modified")
        patched = merge_patch(obj, patch)
        patched["metadata"]["resourceVersion"] = self.next_rv()
        key = (kind, namespace or "", name)
        if patched["metadata"].get("deletionTimestamp") and not patched["metadata"].get(
            "finalizers"
        ):
            del self.objects[key]  # the last finalizer went: the object is gone
        else:
            self.objects[key] = patched
        return copy.deepcopy(patched)

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        self.calls.append(("delete", kind, name))
        if kind in self.refuse_delete:
            raise self.refuse_delete[kind]
        self.deleted.append((kind, namespace or "", name))
        return self.objects.pop((kind, namespace or "", name), None) is not None

    async def event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None:
        self.calls.append(("event", reason, involved["metadata"]["name"]))
        if self.refuse_events:
            raise errors.ApiError(403, "Forbidden", "events are forbidden")
        self.events.append({"type": type_, "reason": reason, "message": message})

    def _existing(self, kind: str, namespace: str | None, name: str) -> Obj:
        obj = self.objects.get((kind, namespace or "", name))
        if obj is None:
            raise errors.ApiError(404, "NotFound", f"{kind} {name} not found")
        return obj
