"""The runtime's side of the platform usage ledger (docs/billing.md).

When the operator meters usage it gives the agent ``BMAD_USAGE_LEDGER_URL`` and the
password of the agent's own ACL user (``BMAD_USAGE_LEDGER_PASSWORD``), and a spool
directory in the pod's emptyDir (``BMAD_USAGE_LEDGER_SPOOL``). Each model call's record
is then kept in the spool before its answer leaves the runtime and shipped to the
agent's usage stream in the background (`bmad_integrations.usage.spool`; without a
spool, appended to the stream and acknowledged before the answer leaves:
`bmad_integrations.usage.writer`), and before each turn the runtime reads its tenant's
budget key (`bmad_integrations.usage.budget`), which the operator sets when the tenant
used up ``spec.limits.tokensPerMonth``. The key is read at most once per
`cache_seconds` per replica, whatever the read's outcome and however many calls come
at once: the budget is enforced within that much of the operator's decision (and one
read's round trip), and a busy agent costs the platform Redis one GET per few seconds,
not one per call. The first read is awaited (calls that come meanwhile wait for it
too); after a state was read, a stale one is read again in the background while calls
go on with the last one seen. A read that fails keeps the last state seen, and is tried
again a period later: while the platform Redis is down, answers kept in the spool go on
without a read (or its time-out) on every call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

from redis import exceptions as redis_errors

from bmad_integrations.usage import budget, record, writer
from bmad_runtime import ports

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SECONDS = 2.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Unavailable(writer.LedgerUnavailable, ports.LedgerUnavailableError):
    """What the writer raises for this runtime: the runtime's error and the writer's at
    once, so a write needs no coroutine of its own to translate one into the other."""

    def __init__(self, message: str) -> None:
        super().__init__(f"the usage record of this call could not be written: {message}")


async def _refused(exc: record.RecordError) -> None:
    raise _Unavailable(str(exc))


class PlatformLedger:
    """`ports.UsageLedger` over the platform Redis, as the agent's ACL user."""

    def __init__(
        self,
        ledger_writer: writer.LedgerWriter,
        *,
        tenant: str,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        clock: Callable[[], dt.datetime] = _now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # The writer raises the runtime's own error (`_Unavailable`), whoever made it.
        ledger_writer.unavailable = _Unavailable
        self.writer = ledger_writer
        self.tenant = tenant
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.monotonic = monotonic
        self._state: budget.State | None = None
        self._read_at = -float("inf")  # when the last read began
        self._reading: asyncio.Future[None] | None = None
        self._read_once = False  # a state has been read (later reads are in the background)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str,
        namespace: str,
        agent: str,
        tenant: str,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        spool_dir: str | None = None,
    ) -> PlatformLedger:
        return cls(
            writer.LedgerWriter.from_url(
                url,
                username=record.acl_user(namespace, agent),
                password=password,
                namespace=namespace,
                agent=agent,
                spool_dir=spool_dir,
            ),
            tenant=tenant,
            cache_seconds=cache_seconds,
        )

    async def aclose(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        await self.writer.aclose()

    def write(self, entry: ports.LedgerEntry) -> Awaitable[object]:
        """The record of one call, sent now (on a live connection): await the result
        before the answer leaves (`ports.UsageLedger.write`)."""
        try:
            return self.writer.append(
                tenant=self.tenant,
                record_id=entry.record_id,
                provider=entry.provider,
                model=entry.model,
                tokens_in=entry.tokens_in,
                tokens_out=entry.tokens_out,
                occurred_at=entry.occurred_at,
                source=entry.source,
                conversation=entry.conversation_id,
            )
        except record.RecordError as exc:
            return _refused(exc)

    async def _read_state(self) -> None:
        try:
            raw = await self.writer.client.execute_command("GET", budget.key(self.tenant))
        except (redis_errors.RedisError, OSError) as exc:
            logger.warning("the tenant's budget could not be read (%s): keeping the last", exc)
            return
        self._state = budget.decode(raw)
        self._read_once = True

    async def exhausted(self) -> ports.Budget | None:
        # Read at most once per `cache_seconds` (from when the read began); between
        # reads (nearly every call) no coroutine but this one.
        now = self.monotonic()
        reading = self._reading
        if now - self._read_at >= self.cache_seconds and (reading is None or reading.done()):
            self._read_at = now  # one read at a time (the client's time-out ends one)
            reading = self._reading = asyncio.ensure_future(self._read_state())
        if not self._read_once and reading is not None and not reading.done():
            # No state read yet: wait for the first read (shared by the calls meanwhile).
            await asyncio.shield(reading)
        state = self._state
        if state is None or not state.refuses(self.clock()):
            return None
        return ports.Budget(
            limit=state.limit, used=state.used, resets_at=state.resets_at, message=state.message()
        )
