"""`reconcilers.writeback.StatusWriter`: decided statuses written in the background,
coalesced per object, against the in-memory API server (`FakeKube`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bmad_operator import errors, events, store
from bmad_operator.reconcilers import writeback

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

NS = "team-a"
KEY = (NS, "todo")
UID = "uid-1"


class GatedKube(FakeKube):
    """A FakeKube whose status writes wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.fail_next = 0

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Any) -> Any:
        self.writing.set()
        await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            self.calls.append(("patch_status_failed", kind, name))
            raise errors.ApiError(500, "InternalError", "etcd is slow")
        return await super().patch_status(kind, namespace, name, status)


def setup() -> tuple[GatedKube, store.Store, writeback.StatusWriter, dict[str, Any]]:
    kube = GatedKube()
    cache = store.Store()
    body = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "todo", "namespace": NS, "uid": UID},
        "spec": {},
    }
    kube.seed(body, cache)
    writer = writeback.StatusWriter(
        api=kube,  # type: ignore[arg-type]
        cache=cache,
        kind="Workflow",
        base_backoff=0.0,
    )
    return kube, cache, writer, body


def started(n: int) -> events.Event:
    return events.Event(events.NORMAL, "StepStarted", f"Step s{n} started")


async def test_a_burst_of_decisions_during_a_write_is_written_once_as_the_latest() -> None:
    kube, cache, writer, body = setup()
    kube.gate.clear()
    writer.submit(KEY, body, {"phase": "Running", "progress": "0/4"}, [started(0)])
    await kube.writing.wait()  # the first write is in flight

    for n in range(1, 4):
        writer.submit(KEY, body, {"phase": "Running", "progress": f"{n}/4"}, [started(n)])
    assert writer.decided(KEY, UID) == {"phase": "Running", "progress": "3/4"}
    kube.gate.set()
    await writer.flush(KEY)

    assert [s["progress"] for s in kube.statuses] == ["0/4", "3/4"]
    assert [e["message"] for e in kube.events] == [f"Step s{n} started" for n in range(4)]
    stored = cache.get("Workflow", NS, "todo")
    assert stored is not None
    assert stored["status"]["progress"] == "3/4"
    # Written: the next pass reads the stored status again.
    assert writer.decided(KEY, UID) is None
    assert writer.pending() == 0


async def test_the_decided_status_is_only_for_the_object_it_was_decided_for() -> None:
    kube, _, writer, body = setup()
    kube.gate.clear()
    writer.submit(KEY, body, {"phase": "Running"}, [])

    assert writer.decided(KEY, UID) == {"phase": "Running"}
    assert writer.decided(KEY, "uid-of-a-new-workflow-by-that-name") is None
    kube.gate.set()
    await writer.flush(KEY)


async def test_a_status_already_stored_is_not_written_again() -> None:
    kube, _, writer, body = setup()
    writer.submit(KEY, body, {"phase": "Running"}, [])
    await writer.flush(KEY)
    kube.reset()

    writer.submit(KEY, body, {"phase": "Running"}, [])
    await writer.flush(KEY)

    assert kube.verbs("patch_status") == []
    assert writer.pending() == 0


async def test_a_failed_write_is_retried_with_the_latest_decision_and_its_events() -> None:
    kube, cache, writer, body = setup()
    kube.fail_next = 1
    kube.gate.clear()
    writer.submit(KEY, body, {"progress": "0/2"}, [started(0)])
    await kube.writing.wait()
    writer.submit(KEY, body, {"progress": "1/2"}, [started(1)])

    kube.gate.set()
    await writer.flush(KEY)

    assert [c[0] for c in kube.calls if c[0].startswith("patch")] == [
        "patch_status_failed",
        "patch_status",
    ]
    assert [s["progress"] for s in kube.statuses] == ["1/2"]
    assert [e["message"] for e in kube.events] == ["Step s0 started", "Step s1 started"]
    stored = cache.get("Workflow", NS, "todo")
    assert stored is not None
    assert stored["status"]["progress"] == "1/2"


async def test_the_writes_of_an_object_that_went_are_dropped() -> None:
    kube, cache, writer, body = setup()
    cache.remove("Workflow", NS, "todo")

    writer.submit(KEY, body, {"phase": "Running"}, [started(0)])
    await writer.flush(KEY)

    assert kube.verbs("patch_status") == []
    assert kube.events == []
    assert writer.decided(KEY, UID) is None


async def test_cancel_drops_what_was_not_written() -> None:
    kube, _, writer, body = setup()
    kube.gate.clear()
    writer.submit(KEY, body, {"phase": "Running"}, [started(0)])
    await kube.writing.wait()

    writer.cancel()
    await writer.flush(KEY)
    kube.gate.set()
    await asyncio.sleep(0)

    assert kube.statuses == []
    assert kube.events == []
    assert writer.decided(KEY, UID) is None
