"""List-and-watch of what the operator reads, straight into the controller.

Every kind the operator watches is watched here but KEDA's ScaledObjects, whose CRD may
come and go (kopf follows those): its own kinds (Agent, Tenant, Integration, Workflow),
Namespaces, HorizontalPodAutoscalers, and the kinds it creates (Deployments, Services,
ConfigMaps, its Secrets and the rest, selected on the server by the operator's labels).
A thousand Agents applied at once make about thirteen watch events per Agent, and kopf
gave each one its whole machinery (a worker per object, its memory of the object, a
logger, a patch, the handler's keyword arguments), a fifth of the operator's CPU in a
py-spy profile of bench/reconcile. Here an event is a decoded line handed to
`Controller.on_event`, as kopf's would have been.

An informer is client-go's reflector, small: list (in pages) and hand every object
over, then watch from the list's resourceVersion with bookmarks, and continue from the
last version seen when a watch ends or breaks. When the server no longer has that
version (410 Gone) it lists again, and reports as deleted what it had seen and the new
list lacks (a deletion it missed while it was not watching). Failures are retried with
backoff and logged once per cause, without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from bmad_operator import errors, kube

log = logging.getLogger(__name__)

Sink = Callable[[Mapping[str, Any]], None]
Key = tuple[str, str]

PAGE = 500
# The server ends a watch after this long (and the client gives up on a silent one a
# little later); the informer then watches again from where it was.
WATCH_SECONDS = 300
WATCH_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=WATCH_SECONDS + 30)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0


class Gone(Exception):  # noqa: N818 - the API server's word for it
    """The version the watch would continue from is no longer kept: list again."""


class Informer:
    """Keeps a sink told of every object of one kind that matches a label selector."""

    def __init__(
        self, api: kube.Kube, kind: str, *, selector: str, sink: Sink, page: int = PAGE
    ) -> None:
        info = kube.RESOURCES[kind]
        self.api = api
        self.kind = kind
        self.api_version = info.api_version
        self.path = kube.path_across_namespaces(kind)
        self.selector = selector
        self.sink = sink
        self.page = page
        self.known: dict[Key, Mapping[str, Any]] = {}
        self.listed = asyncio.Event()  # set once the first listing is handed over
        self.version: str | None = None  # where the next watch starts; None: list first
        self._failure: str | None = None

    async def run(self) -> None:
        """List and watch until cancelled."""
        backoff = BACKOFF_FIRST
        while True:
            try:
                if self.version is None:
                    self.version = await self._list()
                    self.listed.set()
                await self._watch(self.version)
                backoff = BACKOFF_FIRST
                self._recovered()
            except Gone:
                log.info("%s: the watch's version is gone, listing again", self.kind)
                self.version = None
            except (errors.ApiError, OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._failed(exc)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _selected(self) -> list[tuple[str, str]]:
        return [("labelSelector", self.selector)] if self.selector else []

    # -- listing ----------------------------------------------------------------------
    async def _list(self) -> str:
        objects: list[dict[str, Any]] = []
        version = ""
        token = ""
        while True:
            query = [("limit", str(self.page)), *self._selected()]
            if token:
                query.append(("continue", token))
            data = await self.api.get_path(self.path, kind=self.kind, query=query)
            objects.extend(data.get("items") or ())
            meta = data.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            token = str(meta.get("continue") or "")
            if not token:
                break
        seen: set[Key] = set()
        for obj in objects:
            # A list's items carry no kind: the watch's objects do.
            obj["kind"] = self.kind
            obj["apiVersion"] = self.api_version
            key = _key(obj)
            seen.add(key)
            self._hand({"type": None, "object": obj}, key)
        for key in [k for k in self.known if k not in seen]:
            self._hand({"type": "DELETED", "object": self.known[key]}, key)
        return version

    # -- watching ---------------------------------------------------------------------
    async def _watch(self, version: str) -> None:
        """Hand over every event from `version` on, keeping `self.version` at the last
        one seen, until the server ends the watch. Raises `Gone` when it must list
        again."""
        query = [
            ("watch", "true"),
            *self._selected(),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(WATCH_SECONDS)),
        ]
        resp = await self.api.send("GET", self.path, query=query, limits=WATCH_TIMEOUT)
        async with resp:
            if resp.status >= 400:
                body = await resp.read()
                raise kube.status_error(resp.status, body)
            pending: list[bytes] = []
            async for chunk in resp.content.iter_any():
                if b"\n" not in chunk:
                    pending.append(chunk)
                    continue
                lines = chunk.split(b"\n")
                if pending:
                    pending.append(lines[0])
                    lines[0] = b"".join(pending)
                    pending = []
                tail = lines.pop()
                if tail:
                    pending.append(tail)
                for line in lines:
                    if line:
                        self._event(line)

    def _event(self, line: bytes) -> None:
        event = json.loads(line)
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone
            code = int(obj.get("code") or 0)
            raise errors.ApiError(code, str(obj.get("reason") or "Error"), str(obj.get("message")))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind != "BOOKMARK":
            self._hand(event, _key(obj))
        if version:
            self.version = str(version)

    def _hand(self, event: Mapping[str, Any], key: Key) -> None:
        if event.get("type") == "DELETED":
            self.known.pop(key, None)
        else:
            self.known[key] = _identity(event["object"])
        try:
            self.sink(event)
        except Exception:
            log.exception("%s %s/%s: the controller failed on a watch event", self.kind, *key)

    # -- reporting --------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> None:
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if cause != self._failure:
            log.warning("%s: watching failed (%s); retrying with backoff", self.kind, cause)
            self._failure = cause
        else:
            log.debug("%s: watching failed again (%s)", self.kind, cause)

    def _recovered(self) -> None:
        if self._failure is not None:
            log.info("%s: watching again", self.kind)
            self._failure = None


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _identity(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """What a deletion found by a later listing reports of the object: who it was, and
    its labels (an owned object's name its owner). Its strings are the interned ones
    the store keeps too, so an entry costs its two small dicts."""
    meta = obj.get("metadata") or {}
    kept: dict[str, Any] = {
        "name": _intern(meta.get("name")),
        "namespace": _intern(meta.get("namespace")),
    }
    labels = meta.get("labels")
    if labels:
        kept["labels"] = {_intern(k): _intern(v) for k, v in labels.items()}
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": kept}


def _intern(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


class Informers:
    """The informers of several kinds, run as tasks until `stop`."""

    def __init__(self, informers: Iterable[Informer]) -> None:
        self.informers = list(informers)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(i.run(), name=f"informer-{i.kind}") for i in self.informers
        ]

    async def listed(self) -> None:
        """Until every informer has handed over its first listing."""
        await asyncio.gather(*(i.listed.wait() for i in self.informers))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
