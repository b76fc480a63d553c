"""The operator's side of the usage ledger, wired in (leader only, like the autoscaler).

While this replica leads, `Metering.run`:

- moves usage records from the platform Redis into the platform PostgreSQL
  (`bmad_integrations.usage.ingester.Ingester`: entries a dead replica left pending
  are claimed after a while, a replayed record is one row);
- every `usage_poll_seconds` reads the ledger's totals per Agent and per Tenant (the
  rollup: a few rows per agent), and for every Tenant with
  ``spec.limits.tokensPerMonth`` decides its budget state
  (`bmad_integrations.usage.budget.decide`) and writes it into the platform Redis key
  the tenant's agents read (written only when it changed, and again after a takeover);
- queues the Agents and Tenants whose usage or budget changed, so that their
  reconcilers, the one writer of each status, show it (`usage_of`, `budget_of`);
- reads, on the same poll, the payment states the Stripe webhook inbox keeps for the
  billed Tenants' customers (`bmad_operator.stripe_endpoint` records them, on any
  replica) and queues the Tenants whose state changed (`payment_of`).

The Agent reconciler also asks it for the agent's ledger writer (`ensure_writer`):
a Redis ACL user that may append to the agent's stream and read its tenant's budget
key, nothing else (`bmad_integrations.usage.acl`). Every `usage_prune_seconds` the loop
removes the writers of deleted Agents (`prune_writers`), and after writers were set or
removed it asks Redis to save its ACL file when it has one (`save_acl`, once a pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bmad_integrations import lazy, stripe_webhooks
from bmad_integrations.usage import (
    acl,
    budget,
    ingester,
    periods,
    prices,
    record,
    reporter,
    store,
)
from bmad_operator import metrics, settings, tenancy, usage_metrics
from bmad_operator import store as cache_mod

if TYPE_CHECKING:
    from redis import asyncio as aioredis
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
Notify = Callable[[Hashable], None]
RETRY_SECONDS = 2.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def tokens_per_month(tenant: Mapping[str, Any]) -> int | None:
    value = ((tenant.get("spec") or {}).get("limits") or {}).get("tokensPerMonth")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def count_ingested(stats: ingester.IngestStats, seconds: float) -> None:
    """One ingestion pass that read entries, in the operator's metrics."""
    metrics.LEDGER_RECORDS.labels(result="inserted").inc(stats.inserted)
    metrics.LEDGER_RECORDS.labels(result="duplicate").inc(stats.duplicates)
    metrics.LEDGER_RECORDS.labels(result="rejected").inc(stats.rejected)
    metrics.LEDGER_INGEST_SECONDS.observe(seconds)


def count_reported(stats: reporter.ReportStats) -> None:
    """One Stripe reporting pass, in the operator's metrics."""
    metrics.STRIPE_METER_EVENTS.labels(result="sent").inc(stats.events_sent)
    for result, batches in (
        ("reported", stats.batches_reported),
        ("unbilled", stats.batches_unbilled),
        ("failed", stats.batches_failed),
        ("stale", stats.batches_stale),
        ("deferred", stats.batches_deferred),
    ):
        metrics.STRIPE_METER_BATCHES.labels(result=result).inc(batches)


def cost_per_month(tenant: Mapping[str, Any]) -> tuple[decimal.Decimal, str] | None:
    """``spec.limits.costPerMonth`` as (amount, currency); None when unset or unreadable
    (the API server's schema refuses a malformed one)."""
    value = ((tenant.get("spec") or {}).get("limits") or {}).get("costPerMonth")
    if not isinstance(value, Mapping):
        return None
    try:
        return decimal.Decimal(str(value["amount"])), str(value["currency"])
    except (KeyError, decimal.InvalidOperation):
        return None


class PriceFile:
    """The price table from a mounted file, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self._seen: tuple[float, int] | None = None
        self._table = prices.EMPTY

    def __call__(self) -> prices.PriceTable:
        if self.path is None:
            return self._table
        try:
            stat = self.path.stat()
        except OSError as exc:
            log.warning("the price table %s cannot be read (%s): keeping the last", self.path, exc)
            return self._table
        seen = (stat.st_mtime, stat.st_size)
        if seen != self._seen:
            try:
                self._table = prices.parse_yaml(self.path.read_text())
            except (prices.PriceTableError, OSError) as exc:
                log.error("the price table %s is refused (%s): keeping the last", self.path, exc)
            self._seen = seen
        return self._table


class Metering:
    """Ingestion, status usage and token budgets from the platform's usage ledger."""

    def __init__(
        self,
        cfg: settings.OperatorSettings,
        cache: cache_mod.Store,
        *,
        notify_agent: Notify,
        notify_tenant: Notify,
        clock: Clock = _now,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.notify_agent = notify_agent
        self.notify_tenant = notify_tenant
        self.clock = clock
        self.agent_url = cfg.agent_ledger_url()
        self.spool = cfg.usage_spool
        self.prices = PriceFile(cfg.prices_file)
        self._redis: aioredis.Redis | None = None
        self._ledger: store.LedgerStore | None = None
        self._ingester: ingester.Ingester | None = None
        self._agents: dict[tuple[str, str], store.PeriodUsage] = {}
        self._tenants: dict[str, store.PeriodUsage] = {}
        self._budgets: dict[str, budget.State] = {}
        self._written: dict[str, str] = {}  # tenant -> the budget key's value we set
        self._writers: dict[tuple[str, str], str] = {}  # agent -> digest of its rules
        self._absent: set[tuple[str, str]] = set()  # writers without an Agent, last look
        self._acl_file: bool | None = None  # whether the Redis saves its ACL (None: unknown)
        self._acl_changed = False  # writers set or removed since the ACL was last saved
        # Whether the store holds the Agents' first listing (set by the operator's start
        # up to its Agent informer's): no writer is pruned before.
        self.agents_listed: Callable[[], bool] = lambda: True
        self._targets: dict[str, reporter.Target | None] = {}  # from the Tenant reconciler
        self._reporter: reporter.Reporter | None = None
        self._payments: dict[str, stripe_webhooks.PaymentState] = {}  # by customer id
        self._backlog: dict[tuple[str, str], int] = {}
        self._unreported: dict[str, int] = {}
        self.loaded = False  # the totals were read at least once

    # -- connections -----------------------------------------------------------------

    def admin(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self.cfg.usage_redis_url,
                decode_responses=True,
                socket_timeout=5,
                socket_connect_timeout=5,
            )
        return self._redis

    async def _connect(self) -> ingester.Ingester:
        if self._ingester is None:
            if self._ledger is None:
                self._ledger = await store.LedgerStore.connect(self.cfg.ledger_dsn)
            self._ingester = ingester.Ingester(
                self.admin(),
                self._ledger,
                consumer=f"{socket.gethostname()}-{os.getpid()}",
                tenant_of=self.tenant_of,
                price_table=self.prices,
                # A new agent's stream is found within one poll (SCAN of the ledger's
                # own Redis, which holds little else).
                discover_every=self.cfg.usage_poll_seconds,
            )
        return self._ingester

    async def aclose(self) -> None:
        self._reporter = None
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._ingester = None

    def tenant_of(self, namespace: str) -> str:
        return tenancy.tenant_name_of_namespace(self.cache, namespace) or namespace

    # -- what the reconcilers read -----------------------------------------------------

    def usage_of_agent(self, namespace: str, name: str) -> store.PeriodUsage | None:
        """The agent's totals; None until the ledger was read (leave the status alone)."""
        if not self.loaded:
            return None
        return self._agents.get((namespace, name)) or self._empty()

    def usage_of_tenant(self, tenant: str) -> store.PeriodUsage | None:
        if not self.loaded:
            return None
        return self._tenants.get(tenant) or self._empty()

    def budget_of(self, tenant: str) -> budget.State | None:
        return self._budgets.get(tenant)

    def payment_of(self, customer_id: str) -> stripe_webhooks.PaymentState | None:
        """What Stripe's webhooks said about the customer; None: nothing (all paid)."""
        return self._payments.get(customer_id)

    def bill_to(self, tenant: str, target: reporter.Target | None) -> None:
        self._targets[tenant] = target

    def report_targets(self, ledger_tenants: set[str]) -> dict[str, reporter.Target]:
        """Tenants to report now: billed ones with their customer, Tenants without billing
        and namespaces without a Tenant as not billed; a Tenant whose billing is not in
        place yet (or whose reconciler has not told us) waits."""
        targets: dict[str, reporter.Target] = {}
        for tenant in ledger_tenants:
            if tenant in self._targets:
                target = self._targets[tenant]
                if target is not None:
                    targets[tenant] = target
            elif self.cache.get("Tenant", None, tenant) is None:
                targets[tenant] = reporter.Target(customer_id=None)
        return targets

    def _empty(self) -> store.PeriodUsage:
        now = self.clock()
        return store.PeriodUsage(
            period_start=periods.containing(now).start,
            this_period=store.Totals(),
            last_period=store.Totals(),
        )

    async def ensure_writer(
        self, *, namespace: str, agent: str, tenant: str, password: str
    ) -> None:
        """The agent's ACL user on the platform Redis, set again only when its rules change
        (and after every takeover: a restarted Redis without an ACL file forgets users)."""
        digest = hashlib.sha256(
            "\0".join(acl.writer_rules(namespace, agent, password, tenant=tenant)).encode()
        ).hexdigest()
        if self._writers.get((namespace, agent)) == digest:
            return
        await acl.ensure_writer(
            self.admin(), namespace=namespace, agent=agent, password=password, tenant=tenant
        )
        self._writers[(namespace, agent)] = digest
        self._acl_changed = True  # saved by the loop, once for any number of writers

    async def save_acl(self) -> None:
        """Have the ledger's Redis save its ACL users to its ACL file, so that a restart
        keeps them; without an ACL file, say once per term what that means. A failure is
        logged: the users are set again on the Agents' passes after the next takeover."""
        self._acl_changed = False
        try:
            saved = await acl.save(self.admin())
        except Exception as exc:  # the writer is set; only its persistence failed
            log.warning("the ledger's ACL users were not saved: %s: %s", type(exc).__name__, exc)
            return
        if not saved and self._acl_file is not False:
            log.warning(
                "the usage ledger's Redis has no ACL file: after it restarts, the agents' "
                "usage writes fail until the operator takes the lease again "
                "(docs/billing.md, 'Why this design')"
            )
        self._acl_file = saved

    async def prune_writers(self) -> list[tuple[str, str]]:
        """Remove the ledger writers (ACL users) of Agents that are gone: a writer whose
        Agent this replica's store did not hold at this look and the one before (so that
        a moment when the store lags the API server removes nothing; an Agent created
        again later is given a new writer by its next pass). An operator that watches one
        namespace prunes only there. Redis closes the removed users' connections; their
        streams stay until the ingester has read them.
        Nothing is looked at before the store holds the Agents' first listing.
        Returns the (namespace, agent) pairs removed."""
        if not self.agents_listed():
            return []
        admin = self.admin()
        watched = self.cfg.namespace
        absent = {
            (namespace, agent)
            for namespace, agent in await acl.writers(admin)
            if (not watched or namespace == watched)
            and self.cache.get("Agent", namespace, agent) is None
        }
        gone = sorted(absent & self._absent)
        self._absent = absent - set(gone)
        for namespace, agent in gone:
            await acl.remove_writer(admin, namespace=namespace, agent=agent)
            self._writers.pop((namespace, agent), None)
            log.info("removed the usage ledger writer of the deleted Agent %s/%s", namespace, agent)
        if gone:
            self._acl_changed = True
        return gone

    # -- the loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Ingest and refresh until ``stop`` is set; errors are logged and retried."""
        # A new term of leadership: what we set and saw may have changed meanwhile.
        self._writers.clear()
        self._written.clear()
        # Saved once at the start of a term too: the last leader may have died between
        # setting a writer and saving.
        self._absent, self._acl_file, self._acl_changed = set(), None, True
        self._agents, self._tenants, self._budgets = {}, {}, {}
        self._payments = {}
        self._backlog, self._unreported = {}, {}
        self.loaded = False
        refreshed = reported = pruned = -float("inf")
        try:
            while not stop.is_set():
                read = 0
                try:
                    ingest = await self._connect()
                    began = time.perf_counter()
                    stats = await ingest.run_once()
                    read = stats.read
                    if read:
                        count_ingested(stats, time.perf_counter() - began)
                    if time.monotonic() - refreshed >= self.cfg.usage_poll_seconds:
                        await self.refresh()
                        refreshed = time.monotonic()
                    if time.monotonic() - reported >= self.cfg.usage_report_seconds:
                        await self.report()
                        reported = time.monotonic()
                    if time.monotonic() - pruned >= self.cfg.usage_prune_seconds:
                        await self.prune_writers()
                        pruned = time.monotonic()
                    if self._acl_changed:
                        await self.save_acl()
                except Exception as exc:  # Redis, PostgreSQL: the entries wait in Redis
                    log.warning("usage metering paused: %s: %s", type(exc).__name__, exc)
                    await self._pause(stop, RETRY_SECONDS)
                    continue
                if not read:
                    await self._pause(stop, 0.5)
        finally:
            metrics.USAGE.set(())  # another replica leads (and exports) now
            await self.aclose()

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def refresh(self) -> None:
        """Read the ledger's totals; decide and publish budgets; queue what changed."""
        ledger = self._ledger
        assert ledger is not None
        now = self.clock()
        tenants = await ledger.tenant_usage(now)
        agents = await ledger.agent_usage(now)
        first = not self.loaded
        changed_agents = {
            k for k in agents.keys() | self._agents.keys() if agents.get(k) != self._agents.get(k)
        }
        changed_tenants = {
            k
            for k in tenants.keys() | self._tenants.keys()
            if tenants.get(k) != self._tenants.get(k)
        }
        self._agents, self._tenants, self.loaded = agents, tenants, True

        budgets: dict[str, budget.State] = {}
        for (_, name), body in self.cache.items("Tenant"):
            this_period = tenants[name].this_period if name in tenants else store.Totals()
            cost_limit, currency = cost_per_month(body) or (None, None)
            state = budget.decide(
                limit=tokens_per_month(body),
                used=this_period.tokens,
                now=now,
                cost_limit=cost_limit,
                cost_used=this_period.cost.get(currency or "", decimal.Decimal(0)),
                currency=currency,
            )
            if state is not None:
                budgets[name] = state
        for name in budgets.keys() | self._budgets.keys() | self._written.keys():
            await self._publish(name, budgets.get(name))
            before = self._budgets.get(name)
            after = budgets.get(name)
            if (before.exhausted if before else None) != (after.exhausted if after else None):
                changed_tenants.add(name)
                namespaces = set(tenancy.tenant_namespaces(self.cache, name))
                changed_agents.update(k for k in self.cache.keys("Agent") if k[0] in namespaces)
        self._budgets = budgets
        changed_tenants.update(await self._refresh_payments(ledger))
        await self._export(tenants, await ledger.model_usage(now))

        if first:  # after a takeover: every status may be stale
            changed_agents.update(self.cache.keys("Agent"))
            changed_tenants.update(name for _, name in self.cache.keys("Tenant"))
        for key in changed_agents:
            if self.cache.get("Agent", key[0], key[1]) is not None:
                self.notify_agent(key)
        for name in changed_tenants:
            if self.cache.get("Tenant", None, name) is not None:
                self.notify_tenant(("", name))

    async def _export(
        self,
        tenants: Mapping[str, store.PeriodUsage],
        models: Mapping[store.ModelKey, store.PeriodUsage],
    ) -> None:
        """Publish the totals just read (and the streams' backlog) as gauges."""
        if self._ingester is not None:
            backlog: dict[tuple[str, str], int] = {}
            # The streams the ingester knows: no second SCAN of the Redis per poll.
            for key, entries in (await self._ingester.backlog(refresh=False)).items():
                with contextlib.suppress(record.RecordError):  # not a usage stream
                    backlog[record.parse_stream_key(key)] = entries
            self._backlog = backlog
        budgets = {}
        for (_, name), body in self.cache.items("Tenant"):
            limit = tokens_per_month(body)
            if limit is not None:
                budgets[name] = limit
        metrics.USAGE.set(
            usage_metrics.families(
                tenants=tenants,
                models=models,
                budgets=budgets,
                backlog=self._backlog,
                unreported=self._unreported,
            )
        )

    async def _refresh_payments(self, ledger: store.LedgerStore) -> set[str]:
        """Read the billed Tenants' payment states; the Tenants whose state changed."""
        customers: dict[str, str] = {}
        for (_, name), body in self.cache.items("Tenant"):
            customer = ((body.get("status") or {}).get("billing") or {}).get("customerId")
            if isinstance(customer, str) and customer:
                customers[customer] = name
        states = (
            await stripe_webhooks.PaymentInbox(ledger.pool).states(sorted(customers))
            if customers
            else {}
        )
        changed = {name for c, name in customers.items() if states.get(c) != self._payments.get(c)}
        self._payments = states
        return changed

    async def report(self) -> reporter.ReportStats:
        """One Stripe pass over the ledger's unreported rows (`reporter.Reporter`)."""
        ledger = self._ledger
        assert ledger is not None
        if self._reporter is None:
            self._reporter = reporter.Reporter(
                ledger, reporter.StripeSender(), meters=self.cfg.meters()
            )
        self._unreported = await ledger.unreported()
        waiting = set(self._unreported) | {b.tenant for b in await ledger.pending()}
        if not waiting:
            return reporter.ReportStats()
        targets = self.report_targets(waiting)
        stats = await self._reporter.report_once(targets)
        count_reported(stats)
        if stats.batches_failed or stats.batches_stale:
            log.error(
                "Stripe metering: %d batches failed, %d stale (docs/billing.md says what to do)",
                stats.batches_failed,
                stats.batches_stale,
            )
        return stats

    async def _publish(self, tenant: str, state: budget.State | None) -> None:
        """Set (or delete) the tenant's budget key when it differs from what we set."""
        value = budget.encode(state) if state is not None else ""
        if self._written.get(tenant) == value:
            return
        key = budget.key(tenant)
        if state is None:
            await self.admin().delete(key)
            self._written.pop(tenant, None)
            return
        await self.admin().set(key, value)
        self._written[tenant] = value
