"""`Controller.start` / `pause`: what leader election switches on and off.

The reconcilers are replaced by recording coroutines that block until released, so a
pass is "in flight" for as long as a test needs; waits are bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

import pytest

from bmad_operator import controller, settings

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

WAIT = 5.0


def event(kind: str, name: str, namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "resourceVersion": "1"}
    if namespace:
        metadata["namespace"] = namespace
    return {"type": "ADDED", "object": {"kind": kind, "metadata": metadata}}


class Passes:
    """Stands in for every reconciler: records keys, blocks until `release`."""

    def __init__(self) -> None:
        self.started: list[Hashable] = []
        self.cancelled: list[Hashable] = []
        self.release = asyncio.Event()
        self.changed = asyncio.Condition()

    async def reconcile(self, key: Hashable) -> None:
        self.started.append(key)
        async with self.changed:
            self.changed.notify_all()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise

    async def until(self, count: int) -> None:
        async def wait() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.started) >= count)

        await asyncio.wait_for(wait(), WAIT)


@pytest.fixture
async def ctl() -> Any:
    c = controller.Controller(FakeKube(), settings.OperatorSettings())  # type: ignore[arg-type]
    passes = Passes()
    for queue in (c.agent_queue, c.integration_queue, c.tenant_queue):
        queue._reconcile = passes.reconcile
    yield c, passes
    await c.pause()


async def test_taking_over_reconciles_everything_the_standby_saw(ctl: Any) -> None:
    c, passes = ctl
    for raw in (
        event("Agent", "mary", "team-a"),
        event("Agent", "john", "team-a"),
        event("Integration", "db", "team-a"),
        event("Tenant", "acme", None),
    ):
        c.on_event(raw)  # as a standby: stored, not queued
    assert not c.leading
    assert [len(q) for q in (c.agent_queue, c.integration_queue, c.tenant_queue)] == [0, 0, 0]

    c.start()
    await passes.until(4)

    assert c.leading
    assert sorted(map(str, passes.started)) == sorted(
        map(str, [("team-a", "mary"), ("team-a", "john"), ("team-a", "db"), ("", "acme")])
    )


async def test_losing_leadership_cancels_passes_in_flight_and_queues_nothing_more(
    ctl: Any,
) -> None:
    c, passes = ctl
    c.on_event(event("Agent", "mary", "team-a"))
    c.start()
    await passes.until(1)

    await c.pause()

    assert not c.leading
    assert passes.cancelled == [("team-a", "mary")]
    assert not c.agent_queue.running
    c.on_event(event("Agent", "john", "team-a"))
    assert len(c.agent_queue) == 0
    assert c.store.get("Agent", "team-a", "john") is not None  # still watched

    # Leading again starts over from everything in the store.
    passes.release.set()
    c.start()
    await passes.until(3)
    assert sorted(map(str, passes.started[1:])) == sorted(
        map(str, [("team-a", "mary"), ("team-a", "john")])
    )


async def test_losing_leadership_drops_the_workflow_status_writes_not_made(ctl: Any) -> None:
    c, _ = ctl
    api: FakeKube = c.api
    workflow = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "todo", "namespace": "team-a", "uid": "uid-todo"},
        "spec": {},
    }
    writing, gate = asyncio.Event(), asyncio.Event()
    patch_status = api.patch_status

    async def slow(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        await gate.wait()
        return await patch_status(*args, **kwargs)

    api.patch_status = slow  # type: ignore[method-assign]
    c.start()
    api.seed(workflow, c.store)  # after start: stored, no pass queued for it
    c.workflows.writes.submit(("team-a", "todo"), workflow, {"phase": "Running"}, [])
    await asyncio.wait_for(writing.wait(), WAIT)

    await c.pause()
    gate.set()
    await asyncio.sleep(0)

    assert c.workflows.writes.pending() == 0
    assert c.workflows.writes.decided(("team-a", "todo"), "uid-todo") is None
    assert api.statuses == [], "the next leader writes from the stored status"
