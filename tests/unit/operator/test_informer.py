"""The informer's list-and-watch against a small in-process API server (aiohttp), which
keeps ConfigMaps with resourceVersions, serves lists in pages and streams watches the
way kube-apiserver does (JSON lines, bookmarks, an ERROR event with 410 when the asked
version is too old). The real API server is exercised by every integration and e2e
test of the operator, whose owned objects all come through informers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client as k8s_client

from bmad_operator import informer, kube

pytestmark = pytest.mark.unit

PATH = "/api/v1/configmaps"
SELECTOR = "app.kubernetes.io/managed-by=bmad-operator"


@dataclass
class FakeServer:
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    version: int = 10
    oldest: int = 0  # a watch from below this gets 410 Gone
    queries: list[dict[str, str]] = field(default_factory=list)
    fail_lists: int = 0  # answer this many lists with 500 first
    split_lines: bool = False  # send each event line in two writes
    end_watch_after: int | None = None  # close a watch after this many events
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0  # open watches end when it changes

    def drop_watches(self) -> None:
        self.generation += 1
        self.changed.set()

    def write(self, kind: str, namespace: str, name: str, data: str = "") -> None:
        self.version += 1
        obj = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "resourceVersion": str(self.version),
                "labels": {"app.kubernetes.io/managed-by": "bmad-operator"},
            },
            "data": {"v": data},
        }
        if kind == "DELETED":
            self.objects.pop((namespace, name), None)
        else:
            self.objects[(namespace, name)] = obj
        self.history.append((self.version, kind, obj))
        self.changed.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.queries.append(query)
        if query.get("watch") == "true":
            return await self._watch(request, int(query["resourceVersion"]))
        if self.fail_lists:
            self.fail_lists -= 1
            return web.json_response(
                {"kind": "Status", "reason": "InternalError", "message": "etcd is slow"},
                status=500,
            )
        items = [
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
            for _, obj in sorted(self.objects.items())
        ]
        start = int(query.get("continue") or 0)
        limit = int(query["limit"])
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return web.json_response({"kind": "ConfigMapList", "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, since: int) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        if since < self.oldest:
            status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            await resp.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
            return resp
        sent = 0
        seen = since
        generation = self.generation
        while self.generation == generation:
            for version, kind, obj in list(self.history):
                if version <= seen:
                    continue
                line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                if self.split_lines:
                    await resp.write(line[:7])
                    await asyncio.sleep(0.01)
                    await resp.write(line[7:])
                else:
                    await resp.write(line)
                seen = version
                sent += 1
                if self.end_watch_after is not None and sent >= self.end_watch_after:
                    return resp
            self.changed.clear()
            bookmark = {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
            }
            await resp.write(json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n")
            await self.changed.wait()
        return resp


@dataclass
class Seen:
    events: list[tuple[str | None, str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: Mapping[str, Any]) -> None:
        obj = event["object"]
        assert obj["kind"] == "ConfigMap"
        assert obj["apiVersion"] == "v1"
        self.events.append((event["type"], obj["metadata"]["name"], obj.get("data", {}).get("v")))
        self.changed.set()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def server() -> AsyncIterator[tuple[FakeServer, kube.Kube]]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_get(PATH, fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = k8s_client.Configuration(host=f"http://127.0.0.1:{port}")
    api = kube.Kube(k8s_client.ApiClient(configuration=cfg))
    try:
        yield fake, api
    finally:
        await api.close()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running(inf: informer.Informer) -> AsyncIterator[informer.Informer]:
    """The informer running, its first listing handed over; cancelled on the way out."""
    task = asyncio.create_task(inf.run())
    try:
        async with asyncio.timeout(10):
            await inf.listed.wait()
        yield inf
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_lists_in_pages_then_watches_from_the_lists_version(
    server: tuple[FakeServer, kube.Kube],
) -> None:
    fake, api = server
    for i in range(5):
        fake.write("ADDED", "team-a", f"cm-{i}", "first")
    seen = Seen()
    inf = informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=seen, page=2)
    async with running(inf):
        assert seen.events == [(None, f"cm-{i}", "first") for i in range(5)]
        lists = [q for q in fake.queries if "watch" not in q]
        assert [q.get("continue") for q in lists] == [None, "2", "4"]
        assert all(q["labelSelector"] == SELECTOR for q in fake.queries)
        fake.write("MODIFIED", "team-a", "cm-1", "second")
        fake.write("DELETED", "team-a", "cm-2")
        fake.write("ADDED", "team-b", "cm-9", "new")
        await seen.until(8)
        assert seen.events[5:] == [
            ("MODIFIED", "cm-1", "second"),
            ("DELETED", "cm-2", ""),  # the object as it was last
            ("ADDED", "cm-9", "new"),
        ]
        watch = next(q for q in fake.queries if q.get("watch") == "true")
        assert watch["resourceVersion"] == "15"  # the list's, not older
        assert watch["allowWatchBookmarks"] == "true"
        assert inf.version == "18"
        assert set(inf.known) == {("team-a", "cm-0"), ("team-a", "cm-1"), ("team-a", "cm-3"),
                                  ("team-a", "cm-4"), ("team-b", "cm-9")}  # fmt: skip


async def test_a_line_split_across_reads_is_one_event(
    server: tuple[FakeServer, kube.Kube],
) -> None:
    fake, api = server
    fake.split_lines = True
    seen = Seen()
    async with running(informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=seen)):
        fake.write("ADDED", "team-a", "cm-0", "x" * 5000)
        fake.write("MODIFIED", "team-a", "cm-0", "y")
        await seen.until(2)
        assert seen.events == [("ADDED", "cm-0", "x" * 5000), ("MODIFIED", "cm-0", "y")]


async def test_an_ended_watch_continues_from_the_last_version_without_repeats(
    server: tuple[FakeServer, kube.Kube],
) -> None:
    fake, api = server
    fake.end_watch_after = 1
    seen = Seen()
    async with running(informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=seen)):
        for i in range(4):
            fake.write("ADDED", "team-a", f"cm-{i}", str(i))
        await seen.until(4)
        await asyncio.sleep(0.2)  # any repeat would be in by now
        assert seen.events == [("ADDED", f"cm-{i}", str(i)) for i in range(4)]
        watches = [q["resourceVersion"] for q in fake.queries if q.get("watch") == "true"]
        assert watches[:4] == ["10", "11", "12", "13"]
        assert [q for q in fake.queries if "watch" not in q] == [fake.queries[0]]  # one list


async def test_gone_lists_again_and_reports_what_was_deleted_meanwhile(
    server: tuple[FakeServer, kube.Kube], caplog: pytest.LogCaptureFixture
) -> None:
    fake, api = server
    fake.write("ADDED", "team-a", "kept", "1")
    fake.write("ADDED", "team-a", "lost", "1")
    seen = Seen()
    inf = informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=seen)
    async with running(inf):
        # While it was not watching: one object deleted, one changed, history compacted.
        fake.history.clear()
        fake.objects.pop(("team-a", "lost"))
        fake.write("MODIFIED", "team-a", "kept", "2")
        fake.history.clear()
        fake.oldest = fake.version + 1
        fake.drop_watches()  # the informer watches again, from a version now too old
        with caplog.at_level(logging.INFO, logger="bmad_operator.informer"):
            await seen.until(4)
        assert seen.events[2:] == [(None, "kept", "2"), ("DELETED", "lost", None)]
        assert set(inf.known) == {("team-a", "kept")}
        assert "listing again" in caplog.text


async def test_a_failing_list_is_retried_and_logged_once_without_a_traceback(
    server: tuple[FakeServer, kube.Kube],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, api = server
    monkeypatch.setattr(informer, "BACKOFF_FIRST", 0.01)
    fake.fail_lists = 3
    fake.write("ADDED", "team-a", "cm-0", "1")
    seen = Seen()
    with caplog.at_level(logging.DEBUG, logger="bmad_operator.informer"):
        async with running(informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=seen)):
            assert seen.events == [(None, "cm-0", "1")]
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert "InternalError" in warnings[0].getMessage()
            assert "etcd is slow" in warnings[0].getMessage()
            assert all(r.exc_info is None for r in caplog.records)


async def test_a_sink_that_raises_does_not_stop_the_watch(
    server: tuple[FakeServer, kube.Kube], caplog: pytest.LogCaptureFixture
) -> None:
    fake, api = server
    seen = Seen()

    def sink(event: Mapping[str, Any]) -> None:
        seen(event)
        if event["object"]["metadata"]["name"] == "bad":
            raise RuntimeError("a bug in a mapper")

    async with running(informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=sink)):
        fake.write("ADDED", "team-a", "bad", "1")
        fake.write("ADDED", "team-a", "good", "1")
        await seen.until(2)
        assert [name for _, name, _ in seen.events] == ["bad", "good"]
        assert "the controller failed on a watch event" in caplog.text


async def test_informers_stop_cancels_every_task(server: tuple[FakeServer, kube.Kube]) -> None:
    _, api = server
    group = informer.Informers(
        informer.Informer(api, "ConfigMap", selector=SELECTOR, sink=Seen()) for _ in range(3)
    )
    group.start()
    async with asyncio.timeout(10):
        await group.listed()
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "informer-ConfigMap"]
    assert len(tasks) == 3
    await group.stop()
    assert all(t.done() for t in tasks)


async def test_without_a_selector_nothing_is_selected_on_the_server(
    server: tuple[FakeServer, kube.Kube],
) -> None:
    fake, api = server
    fake.write("ADDED", "team-a", "cm-0", "1")
    seen = Seen()
    async with running(informer.Informer(api, "ConfigMap", selector="", sink=seen)):
        fake.write("MODIFIED", "team-a", "cm-0", "2")
        await seen.until(2)
        assert fake.queries
        assert all("labelSelector" not in q for q in fake.queries)
