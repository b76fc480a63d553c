"""Wiring: the store, the work queue, the reconcilers and the periodic resync.

The watch streams (the operator's informers, and kopf's for KEDA's ScaledObjects) feed
`on_event`: the store takes the object, then the event is
routed through the watches each reconciler declares (`watching`) to its work queue.
Everything else happens in our own workers, so an event storm (a thousand Agents
applied at once) becomes a bounded number of concurrent reconciles, and several
events about one Agent become one reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Hashable, Mapping
from typing import Any

from bmad_operator import admission, kube, metering, settings, store, watching, workqueue
from bmad_operator.autoscaling import autoscaler, budget, prometheus, streams
from bmad_operator.builders import meta
from bmad_operator.reconcilers import agent as agent_reconciler
from bmad_operator.reconcilers import integration as integration_reconciler
from bmad_operator.reconcilers import tenant as tenant_reconciler
from bmad_operator.reconcilers import workflow as workflow_reconciler

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, api: kube.Kube, cfg: settings.OperatorSettings) -> None:
        self.api = api
        self.cfg = cfg
        self.store = store.Store()
        # The budget webhook reads the API server, never this store (see admission).
        self.budget = admission.BudgetWebhook(api)
        self.prometheus: prometheus.Client | prometheus.Unconfigured = (
            prometheus.Client(cfg.prometheus_url, timeout=cfg.prometheus_timeout_seconds)
            if cfg.prometheus_url
            else prometheus.Unconfigured()
        )
        self.streams = streams.StreamLengths(self.store, policy=cfg.egress_policy())
        # The autoscaler writes spec.replicas (through /scale) and hands its report to
        # the Agent reconciler, the one writer of an Agent's status.
        self.autoscaler = autoscaler.Autoscaler(
            api,
            self.prometheus,
            self.store,
            queues=self.streams,
            notify=self._queue_agent,
            cap_for=lambda body: budget.tenant_cap(self.store, body),
        )
        # The usage ledger (leader only, like the autoscaler): it hands what changed to
        # the Agent and Tenant reconcilers, the writers of their status.
        self.metering: metering.Metering | None = (
            metering.Metering(
                cfg, self.store, notify_agent=self._queue_agent, notify_tenant=self._queue_tenant
            )
            if cfg.metering
            else None
        )
        self.agents = agent_reconciler.AgentReconciler(
            api=api,
            cache=self.store,
            runtime_image=cfg.runtime_image,
            scaling=self.autoscaler,
            prometheus_url=cfg.prometheus_url,
            usage=self.metering,
        )
        self.agent_queue = workqueue.WorkQueue("Agent", self.agents.reconcile, workers=cfg.workers)
        self.integrations = integration_reconciler.IntegrationReconciler(api=api, cache=self.store)
        self.integration_queue = workqueue.WorkQueue(
            "Integration", self.integrations.reconcile, workers=max(4, cfg.workers // 2)
        )
        self.integrations.queue = self.integration_queue
        self.tenants = tenant_reconciler.TenantReconciler(
            api=api,
            cache=self.store,
            operator_namespace=cfg.system_namespace,
            usage=self.metering,
            payment_grace=dt.timedelta(seconds=cfg.payment_grace_seconds),
            egress_policy=cfg.egress_policy(),
        )
        self.tenant_queue = workqueue.WorkQueue("Tenant", self.tenants.reconcile, workers=4)
        self.workflows = workflow_reconciler.WorkflowReconciler(
            api=api, cache=self.store, poll_seconds=cfg.workflow_poll_seconds
        )
        self.workflow_queue = workqueue.WorkQueue(
            "Workflow", self.workflows.reconcile, workers=max(4, cfg.workers // 2)
        )
        self.workflows.queue = self.workflow_queue
        # kind -> (queue, declaration): each reconciler's watches, routed to its queue
        # (and the autoscaler's, to itself: it tracks the Agents it scales).
        self._routes: dict[str, list[tuple[watching.Sink, watching.Watch]]] = {}
        sinks: tuple[tuple[watching.Sink, list[watching.Watch]], ...] = (
            (self.agent_queue, self.agents.watches()),
            (self.integration_queue, self.integrations.watches()),
            (self.tenant_queue, self.tenants.watches()),
            (self.workflow_queue, self.workflows.watches()),
            (self.autoscaler, self.autoscaler.watches()),
        )
        for queue, declared in sinks:
            for watch in declared:
                self._routes.setdefault(watch.kind, []).append((queue, watch))
        self._resync: asyncio.Task[None] | None = None
        self._leading = False
        self._stop_autoscaler = asyncio.Event()
        self._autoscaling: asyncio.Task[None] | None = None
        self._metering: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        """Whether this replica reconciles (its store is kept current either way)."""
        return self._leading

    def start(self) -> None:
        """Start reconciling: the workers, the resync, and one pass over everything the
        store already holds (a replica that takes over from a dead leader does not know
        which objects it had finished)."""
        if self._leading:
            return
        self._leading = True
        self.agent_queue.start()
        self.integration_queue.start()
        self.tenant_queue.start()
        self.workflow_queue.start()
        self._resync = asyncio.create_task(self._resync_loop(), name="resync")
        self._stop_autoscaler = asyncio.Event()
        self._autoscaling = asyncio.create_task(
            self.autoscaler.run(self._stop_autoscaler), name="autoscaler"
        )
        if self.metering is not None:
            self._metering = asyncio.create_task(
                self.metering.run(self._stop_autoscaler), name="metering"
            )
        for queue, kind in (
            (self.tenant_queue, "Tenant"),
            (self.integration_queue, "Integration"),
            (self.agent_queue, "Agent"),
            (self.workflow_queue, "Workflow"),
        ):
            for key in self.store.keys(kind):
                queue.add(key)

    async def pause(self) -> None:
        """Stop reconciling at once (leadership lost): no new pass starts, the passes in
        flight are cancelled, queued work is dropped. The store stays current."""
        if not self._leading:
            return
        self._leading = False
        if self._resync:
            self._resync.cancel()
        for queue in (
            self.agent_queue,
            self.integration_queue,
            self.tenant_queue,
            self.workflow_queue,
        ):
            queue.cancel()  # all of them now, before waiting for any
        # Status writes still on their way: whoever leads next starts from the stored one.
        self.workflows.writes.cancel()
        if self._resync:
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
            self._resync = None
        if self._autoscaling:
            self._stop_autoscaler.set()
            await self._autoscaling
            self._autoscaling = None
        if self._metering:
            self._stop_autoscaler.set()
            await self._metering
            self._metering = None
        await self.agent_queue.stop()
        await self.integration_queue.stop()
        await self.tenant_queue.stop()
        await self.workflow_queue.stop()

    async def stop(self) -> None:
        await self.pause()
        await self.prometheus.aclose()
        await self.streams.aclose()
        await self.workflows.bus.close()
        await self.api.close()

    def _queue_agent(self, key: Hashable) -> None:
        """The autoscaler (or the ledger) has news of an Agent: its reconciler writes it."""
        self.agent_queue.add(key)

    def _queue_tenant(self, key: Hashable) -> None:
        """The ledger has news of a Tenant (usage, budget): its reconciler writes it."""
        self.tenant_queue.add(key)

    # -- events -------------------------------------------------------------------
    def on_event(self, raw: Mapping[str, Any]) -> None:
        """Keep the store current, then queue what the reconcilers' watches ask for."""
        event = watching.parse(raw)
        if event is None:
            return
        if event.deleted:
            self.store.remove(event.kind, event.namespace, event.name)
        else:
            self.store.put(_cached_form(event))
        if not self._leading:
            return  # a standby: the leader acts; `start` catches up on taking over
        for queue, watch in self._routes.get(event.kind, ()):
            for request in watch.map(event):
                _enqueue(queue, request)

    # -- resync -------------------------------------------------------------------
    async def _resync_loop(self) -> None:
        """Every object again every `resync_seconds`, spread out with jitter."""
        period = self.cfg.resync_seconds
        while True:
            await asyncio.sleep(period * random.uniform(0.9, 1.1))  # noqa: S311
            for key in self.store.keys("Agent"):
                self.agent_queue.add_after(key, random.uniform(0, period * 0.1))  # noqa: S311
            for key in self.store.keys("Tenant"):
                self.tenant_queue.add_after(key, random.uniform(0, period * 0.1))  # noqa: S311
            for key in self.store.keys("Integration"):
                # Cheap unless a check is due: the reconciler remembers what it checked.
                self.integration_queue.add_after(key, random.uniform(0, period * 0.1))  # noqa: S311
            for key in self.store.keys("Workflow"):
                # A run that ended costs nothing: its pass returns at once.
                self.workflow_queue.add_after(key, random.uniform(0, period * 0.1))  # noqa: S311


def _cached_form(event: watching.WatchEvent) -> Mapping[str, Any]:
    """What the store keeps of an object: all of it, but of users' Secrets only that
    they exist and their version, never their data."""
    if event.kind != "Secret" or meta.is_managed(event.labels):
        return event.body
    metadata = event.body.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": event.name,
            "namespace": metadata.get("namespace"),
            "uid": metadata.get("uid"),
            "resourceVersion": metadata.get("resourceVersion"),
        },
    }


def _enqueue(queue: watching.Sink, request: watching.Request) -> None:
    if request.forget:
        queue.forget(request.key)
    elif request.delay:
        queue.add_after(request.key, request.delay)
    else:
        queue.add(request.key)
