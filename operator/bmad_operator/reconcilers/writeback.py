"""Write a reconciler's decided status and Events in the background, coalesced per object.

A pass hands over what it decided (`StatusWriter.submit`) and ends; one writer task per
object writes it. While a write is in flight, newer decisions replace the pending one:
only the latest decided status is written next (each is the whole status the pass
decided, so nothing in between is lost), and the Events queued meanwhile are posted
after the write that records them, in order, a few at a time.

The next pass of the object starts from the status decided in memory
(`StatusWriter.decided`) while it is not yet stored, and from the stored one once it is
(or in a new process: memory is empty, the cluster is the truth). The decided status is
kept only for the object (uid) it was decided for, and only until its write returns.

A write that fails is retried with backoff, the latest decision first; a missing object
(deleted) drops what was pending for it. `flush` waits until nothing is pending (a pass
that ends the run, or releases a finalizer, writes first); `cancel` drops everything at
once (leadership lost: whoever leads next starts from the stored status).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bmad_operator import errors, events, kube, metrics, store
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    uid: str
    body: Mapping[str, Any]  # the object the status and Events belong to
    pending: dict[str, Any] | None = None  # decided, not yet being written
    writing: dict[str, Any] | None = None  # being written now
    events: list[events.Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


def _stored_already(current: Mapping[str, Any] | None, status: Mapping[str, Any]) -> bool:
    return all((current or {}).get(k) == v for k, v in status.items())


class StatusWriter:
    def __init__(
        self,
        *,
        api: kube.Kube,
        cache: store.Store,
        kind: str,
        event_concurrency: int = 4,
        base_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.api = api
        self.cache = cache
        self.kind = kind
        self._slots: dict[Hashable, _Slot] = {}
        self._event_slots = asyncio.Semaphore(event_concurrency)
        self._base = base_backoff
        self._max = max_backoff

    def decided(self, key: Hashable, uid: str) -> dict[str, Any] | None:
        """The latest status decided for object `uid` whose write has not returned yet."""
        slot = self._slots.get(key)
        if slot is None or slot.uid != uid:
            return None
        return slot.pending if slot.pending is not None else slot.writing

    def submit(
        self,
        key: Hashable,
        body: Mapping[str, Any],
        status: dict[str, Any],
        posted: list[events.Event],
    ) -> None:
        """Queue the write of `status` (replacing any pending one) and of `posted`."""
        uid = str(body["metadata"].get("uid") or "")
        slot = self._slots.get(key)
        if slot is not None and slot.uid != uid:
            self._drop(key)  # a new object under the old name: the old one's writes go
            slot = None
        if slot is None:
            known = (self.cache.get(self.kind, *_name(body)) or {}).get("status")
            if _stored_already(known, status) and not posted:
                return
            slot = self._slots[key] = _Slot(uid=uid, body=body)
        slot.body = body
        latest = slot.pending if slot.pending is not None else slot.writing
        if latest is None or not _stored_already(latest, status):
            slot.pending = status
        slot.events.extend(posted)
        if slot.task is None and (slot.pending is not None or slot.events):
            slot.task = asyncio.create_task(self._run(key, slot), name=f"{self.kind}-write")
        elif slot.task is None:
            del self._slots[key]

    async def flush(self, key: Hashable) -> None:
        """Wait until everything submitted for `key` is written (or dropped)."""
        while (slot := self._slots.get(key)) is not None and slot.task is not None:
            task = slot.task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this wait was cancelled, not the writer

    def pending(self) -> int:
        """Objects with a write pending or in flight."""
        return len(self._slots)

    def forget(self, key: Hashable) -> None:
        self._drop(key)

    def cancel(self) -> None:
        """Drop every pending write at once and stop the writers."""
        for key in list(self._slots):
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()

    async def _run(self, key: Hashable, slot: _Slot) -> None:
        failures = 0
        try:
            while slot.pending is not None or slot.events:
                status, slot.pending = slot.pending, None
                slot.writing = status
                posted, slot.events = slot.events, []
                try:
                    with metrics.STATUS_WRITE_SECONDS.labels(kind=self.kind).time():
                        if status is not None:
                            await self._write(slot.body, status)
                        await asyncio.gather(*(self._post(slot.body, e) for e in posted))
                except errors.ApiError as exc:
                    if exc.not_found:
                        return  # the object is gone, and what it was to hold with it
                    failures += 1
                    delay = self._retry(slot, status, posted, failures)
                    log.warning(
                        "%s %s: status write failed, retrying in %.1fs: %s",
                        self.kind,
                        key,
                        delay,
                        exc,
                    )
                    await asyncio.sleep(delay)
                except Exception:
                    failures += 1
                    delay = self._retry(slot, status, posted, failures)
                    log.exception(
                        "%s %s: status write failed, retrying in %.1fs", self.kind, key, delay
                    )
                    await asyncio.sleep(delay)
                else:
                    failures = 0
                finally:
                    slot.writing = None
        finally:
            slot.task = None
            if self._slots.get(key) is slot:
                del self._slots[key]

    def _retry(
        self,
        slot: _Slot,
        status: dict[str, Any] | None,
        posted: list[events.Event],
        failures: int,
    ) -> float:
        """Put back what failed (a newer decided status wins over it); the backoff."""
        if slot.pending is None:
            slot.pending = status
        slot.events[:0] = posted
        return float(min(self._max, self._base * 2.0 ** min(failures - 1, 16)))

    async def _write(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        namespace, name = _name(body)
        current = self.cache.get(self.kind, namespace, name)
        if current is None or current["metadata"].get("uid") != body["metadata"].get("uid"):
            raise errors.ApiError(404, "NotFound", f"{self.kind} {namespace}/{name} is gone")
        if _stored_already(current.get("status"), status):
            return
        updated = await self.api.patch_status(self.kind, namespace, name, status)
        if updated:
            self.cache.put(updated)

    async def _post(self, body: Mapping[str, Any], event: events.Event) -> None:
        async with self._event_slots:
            await common.post_event(self.api, body, event)


def _name(body: Mapping[str, Any]) -> tuple[str | None, str]:
    meta = body["metadata"]
    return meta.get("namespace"), meta["name"]
