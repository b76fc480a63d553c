"""A keyed work queue: level-triggered reconciles, deduplicated, one at a time per key.

kopf calls our handlers once per event; many events for one Agent (its own change,
each owned object's change, the resync) collapse here into one pending key. A key
being reconciled is never handed to a second worker; if it is queued again meanwhile
it runs once more afterwards. Failures come back with exponential backoff; the
failure categories (`Transient`, `Requeue`) are the ones in `errors`, shared with the
API client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Hashable

from bmad_operator import errors, metrics

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(
        self,
        kind: str,
        reconcile: Callable[[Hashable], Awaitable[None]],
        *,
        workers: int = 16,
        base_backoff: float = 1.0,
        max_backoff: float = 300.0,
    ) -> None:
        self.kind = kind
        self._reconcile = reconcile
        self._workers = workers
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._pending: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._base = base_backoff
        self._max = max_backoff

    def add(self, key: Hashable) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._pending:
            return
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        self._pending.add(key)
        self._queue.put_nowait(key)
        metrics.QUEUE_DEPTH.labels(kind=self.kind).set(len(self._pending))

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queue `key` in `delay` seconds; of two timers for one key, the earlier wins."""
        if key in self._pending:
            return
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= loop.time() + delay:
                return
            timer.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()

    def start(self) -> None:
        for i in range(self._workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"{self.kind}-worker-{i}"))

    def cancel(self) -> None:
        """Cancel the workers without waiting for them (`stop` waits and clears)."""
        for task in self._tasks:
            task.cancel()

    async def stop(self) -> None:
        """Cancel the workers (a reconcile in flight stops at its next await) and forget
        every pending key, timer and failure: a queue started again begins empty. That is
        what losing leadership needs; whoever leads next starts from a full resync."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue = asyncio.Queue()
        self._pending.clear()
        self._active.clear()
        self._dirty.clear()
        self._failures.clear()
        metrics.QUEUE_DEPTH.labels(kind=self.kind).set(0)

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def __len__(self) -> int:
        return len(self._pending)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._pending.discard(key)
            metrics.QUEUE_DEPTH.labels(kind=self.kind).set(len(self._pending))
            self._active.add(key)
            try:
                await self._reconcile(key)
            except errors.Requeue as again:
                self.add_after(key, again.delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                n = min(self._failures.get(key, 0) + 1, 64)  # 2**63 s is "the cap" already
                self._failures[key] = n
                delay = min(self._max, self._base * 2.0 ** (n - 1)) * random.uniform(0.8, 1.2)  # noqa: S311
                if isinstance(exc, errors.Transient):
                    log.warning(
                        "reconcile of %s %s: %s; retrying in %.1fs", self.kind, key, exc, delay
                    )
                else:
                    # A bug, not a user error: keep the traceback for whoever fixes it.
                    log.exception(
                        "reconcile of %s %s failed; retrying in %.1fs", self.kind, key, delay
                    )
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
