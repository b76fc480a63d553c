"""The operator's side of the ledger: every usage stream into PostgreSQL, once.

Each pass reads entries from every ``bmad:usage:*`` stream through the consumer group
``ledger``, prices them, writes them to the ledger in one transaction (`store.insert`,
``ON CONFLICT DO NOTHING``), and only then acknowledges and deletes them from their
streams. So:
- an ingester killed before its commit leaves the entries pending: it reads them
  again when it comes back (its own pending list), or another replica claims them
  once they have been idle for `min_idle_ms`;
- one killed after its commit but before its XACK reads them again, and the ledger's
  key makes the second insert a no-op;
- a stream holds exactly what is not in the ledger yet: XLEN is the backlog.

Identity comes from the stream, never from the record. The ACL lets only the agent's
own user append to ``bmad:usage:<namespace>:<agent>``, so the namespace and agent are
the key's; a record that claims others is rejected. The tenant billed is the one the
operator says owns the namespace (`tenant_of`), whatever the record says. Rejected
entries go to ``usage_rejected`` with their reason, and are acknowledged too, so a
malformed entry never blocks the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bmad_integrations import lazy
from bmad_integrations.usage import prices, record, store

if TYPE_CHECKING:
    from redis import asyncio as aioredis
    from redis import exceptions as redis_errors
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")
    redis_errors = lazy.module("redis.exceptions")

log = logging.getLogger(__name__)

GROUP = "ledger"
KEYS_PER_CALL = 200
Clock = Callable[[], dt.datetime]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class IngestStats:
    """What one pass (or a whole run, summed) did."""

    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    claimed: int = 0
    streams: int = 0

    def add(self, other: IngestStats) -> None:
        for name in ("read", "inserted", "duplicates", "rejected", "claimed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.streams = other.streams


@dataclass(frozen=True)
class _Entry:
    key: str
    entry_id: str
    fields: Mapping[str, str]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(key: str, items: Iterable[Any]) -> list[_Entry]:
    found = []
    for entry_id, fields in items:
        if fields is None:  # deleted while pending: nothing to ingest, only to ack
            found.append(_Entry(key, _text(entry_id), {}))
            continue
        found.append(_Entry(key, _text(entry_id), {_text(k): _text(v) for k, v in fields.items()}))
    return found


def judge(
    entry_key: str,
    fields: Mapping[str, str],
    *,
    tenant_of: Callable[[str], str],
    table: prices.PriceTable,
    now: dt.datetime,
) -> store.LedgerRow:
    """The ledger row for one stream entry, or RecordError saying why it is refused.

    Pure: the namespace and agent must be the stream's, the tenant is the one that
    owns the namespace, a time in the future is taken as now (a skewed clock must not
    move usage into a later period), and the cost comes from the platform's table.
    """
    namespace, agent = record.parse_stream_key(entry_key)
    rec = record.decode(fields)
    if (rec.namespace, rec.agent) != (namespace, agent):
        raise record.RecordError(
            "WrongStream",
            f"a record of {rec.namespace}/{rec.agent} arrived on the stream of {namespace}/{agent}",
        )
    tenant = tenant_of(namespace)
    changes: dict[str, Any] = {}
    if rec.tenant != tenant:
        changes["tenant"] = tenant
    if rec.occurred_at > now:
        changes["occurred_at"] = now
    if changes:
        rec = dataclasses.replace(rec, **changes)
    cost = prices.apply(
        table,
        provider=rec.provider,
        model=rec.model,
        tokens_in=rec.tokens_in,
        tokens_out=rec.tokens_out,
    )
    return store.LedgerRow(record=rec, cost=cost)


class Ingester:
    """Moves usage records from the platform Redis into the ledger."""

    def __init__(
        self,
        redis: aioredis.Redis,
        ledger: store.LedgerStore,
        *,
        consumer: str,
        tenant_of: Callable[[str], str] | None = None,
        price_table: Callable[[], prices.PriceTable] | prices.PriceTable = prices.EMPTY,
        count: int = 500,
        min_idle_ms: int = 60_000,
        discover_every: float = 10.0,
        claim_every: float = 30.0,
        clock: Clock = _now,
        match: str = record.STREAM_PREFIX + ":*",
    ) -> None:
        if not match.startswith(record.STREAM_PREFIX + ":"):
            raise ValueError(f"match must start with {record.STREAM_PREFIX}:")
        self.redis = redis
        self.match = match
        self.ledger = ledger
        self.consumer = consumer
        self.tenant_of = tenant_of or (lambda namespace: namespace)
        self._prices = price_table
        self.count = count
        self.min_idle_ms = min_idle_ms
        self.discover_every = discover_every
        self.claim_every = claim_every
        self.clock = clock
        self._keys: list[str] = []
        self._grouped: set[str] = set()
        self._discovered_at = -float("inf")
        self._claimed_at = -float("inf")

    def prices(self) -> prices.PriceTable:
        return self._prices() if callable(self._prices) else self._prices

    # -- streams ---------------------------------------------------------------------

    async def discover(self) -> list[str]:
        """Every usage stream matching `match` (SCAN, so it never blocks the server)."""
        keys = set()
        async for key in self.redis.scan_iter(match=self.match, count=1000, _type="stream"):
            name = _text(key)
            try:
                record.parse_stream_key(name)
            except record.RecordError:
                continue
            keys.add(name)
        return sorted(keys)

    async def _ensure_group(self, key: str) -> None:
        try:
            # From the first entry: whatever an agent wrote before we looked is read.
            await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped.add(key)

    async def _streams(self, *, refresh: bool) -> list[str]:
        if refresh or time.monotonic() - self._discovered_at >= self.discover_every:
            self._keys = await self.discover()
            self._discovered_at = time.monotonic()
        for key in self._keys:
            if key not in self._grouped:
                await self._ensure_group(key)
        return self._keys

    async def backlog(self, *, refresh: bool = True) -> dict[str, int]:
        """Entries not yet in the ledger, per stream (XLEN: ingested ones are deleted).

        ``refresh=False`` reads the streams the ingester knows (found again every
        ``discover_every``) instead of scanning the Redis for new ones first."""
        keys = await self._streams(refresh=refresh)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xlen(key)
            lengths = await pipe.execute()
        return {key: int(n) for key, n in zip(keys, lengths, strict=True)}

    # -- one pass --------------------------------------------------------------------

    async def _read(self, keys: Sequence[str], last_id: str) -> list[_Entry]:
        found: list[_Entry] = []
        for start in range(0, len(keys), KEYS_PER_CALL):
            chunk = keys[start : start + KEYS_PER_CALL]
            try:
                response: Any = await self.redis.xreadgroup(
                    GROUP,
                    self.consumer,
                    streams=dict.fromkeys(chunk, last_id),
                    count=self.count,
                )
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # A stream deleted (or Redis emptied) since we looked: look again.
                self._grouped.difference_update(chunk)
                self._discovered_at = -float("inf")
                continue
            for key, items in response or []:
                found.extend(_entries(_text(key), items))
        return found

    async def _claim(self, keys: Sequence[str]) -> list[_Entry]:
        """Entries another consumer (a dead operator replica) left pending too long."""
        found: list[_Entry] = []
        for key in keys:
            cursor = "0-0"
            while True:
                try:
                    reply: Any = await self.redis.xautoclaim(
                        key,
                        GROUP,
                        self.consumer,
                        min_idle_time=self.min_idle_ms,
                        start_id=cursor,
                        count=self.count,
                    )
                except redis_errors.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self._grouped.discard(key)
                    break
                cursor = _text(reply[0])
                found.extend(_entries(key, reply[1]))
                if cursor == "0-0" or len(found) >= self.count:
                    break
        return found

    async def run_once(self, *, refresh: bool = False) -> IngestStats:
        """One pass: our pending entries first, then stale ones, then new ones."""
        keys = await self._streams(refresh=refresh)
        stats = IngestStats(streams=len(keys))
        if not keys:
            return stats
        # Entries delivered to us but not acknowledged (an insert that failed): again.
        entries = await self._read(keys, "0")
        if time.monotonic() - self._claimed_at >= self.claim_every:
            claimed = await self._claim(keys)
            self._claimed_at = time.monotonic()
            stats.claimed = len(claimed)
            entries.extend(claimed)
        if not entries:
            entries = await self._read(keys, ">")
        if not entries:
            return stats
        stats.read = len(entries)
        now = self.clock()
        table = self.prices()
        rows: list[store.LedgerRow] = []
        rejected: list[store.Rejected] = []
        for entry in entries:
            if not entry.fields:
                continue
            try:
                rows.append(
                    judge(entry.key, entry.fields, tenant_of=self.tenant_of, table=table, now=now)
                )
            except record.RecordError as exc:
                log.warning("usage entry %s of %s refused: %s", entry.entry_id, entry.key, exc)
                rejected.append(
                    store.Rejected(entry.key, entry.entry_id, exc.reason, exc.message, entry.fields)
                )
        stats.rejected = len(rejected)
        stats.inserted = await self.ledger.insert(rows, rejected)
        stats.duplicates = len(rows) - stats.inserted
        await self._ack(entries)
        return stats

    async def _ack(self, entries: Sequence[_Entry]) -> None:
        by_key: dict[str, list[str]] = {}
        for entry in entries:
            by_key.setdefault(entry.key, []).append(entry.entry_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ids in by_key.items():
                pipe.xack(key, GROUP, *ids)
                pipe.xdel(key, *ids)
            await pipe.execute()

    async def run(self, stop: asyncio.Event, *, interval: float = 0.5) -> IngestStats:
        """Pass after pass until ``stop`` is set; errors are logged and retried."""
        total = IngestStats()
        while not stop.is_set():
            try:
                stats = await self.run_once()
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("usage ingestion paused: Redis: %s", exc)
                stats = IngestStats()
            except Exception as exc:  # PostgreSQL or anything else: keep the entries
                log.warning("usage ingestion paused: %s: %s", type(exc).__name__, exc)
                stats = IngestStats()
            total.add(stats)
            if stats.read:
                continue  # more may be waiting: no pause between full passes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        return total

    async def retire(self, namespace: str, agent: str) -> bool:
        """Delete an agent's stream once nothing is left in it (after its deletion)."""
        key = record.stream_key(namespace, agent)
        if await self.redis.xlen(key):
            return False
        deleted = await self.redis.delete(key)
        self._grouped.discard(key)
        self._keys = [k for k in self._keys if k != key]
        return bool(deleted)
