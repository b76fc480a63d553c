"""A watched kind whose CRD goes away does not end the operator (kopf's watch stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.clients import watching as kopf_watching

from bmad_operator import handlers

pytestmark = pytest.mark.unit


async def test_a_404_ends_the_stream_after_a_pause_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: kopf's continuous_watch raised APINotFoundError up to the operator's task
    group, which ended the operator (CI run 6: 'Watcher for scaledobjects.v1alpha1.keda.sh
    has failed: 404 page not found')."""
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(handlers.asyncio, "sleep", pause)

    async def gone(**_: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "ADDED", "object": {}}
        raise kopf_errors.APINotFoundError("404 page not found", status=404, headers={})

    stream = handlers.tolerate_vanished_resources(gone)
    events = [event async for event in stream(resource="scaledobjects")]
    assert events == [{"type": "ADDED", "object": {}}]
    assert pauses == [handlers.GONE_RESOURCE_PAUSE]


async def test_other_errors_still_end_the_stream() -> None:
    async def refused(**_: Any) -> AsyncIterator[dict[str, Any]]:
        raise kopf_errors.APIForbiddenError("forbidden", status=403, headers={})
        yield {}  # an async generator

    with pytest.raises(kopf_errors.APIForbiddenError):
        _ = [event async for event in handlers.tolerate_vanished_resources(refused)()]


def test_kopfs_watch_loop_uses_the_tolerant_stream() -> None:
    assert getattr(kopf_watching.continuous_watch, "tolerates_vanished_resources", False)
