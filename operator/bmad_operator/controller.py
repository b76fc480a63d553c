"""Wiring: the store, the work queue, the reconcilers and the periodic resync.

kopf's watch streams feed `on_event`; everything else happens in our own workers,
so an event storm (a thousand Agents applied at once) becomes a bounded number of
concurrent reconciles, and several events about one Agent become one reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from typing import Any

from bmad_operator import kube, settings, store, tenancy, workqueue
from bmad_operator.builders import meta
from bmad_operator.reconcilers import agent as agent_reconciler
from bmad_operator.reconcilers import integration as integration_reconciler
from bmad_operator.reconcilers import tenant as tenant_reconciler

log = logging.getLogger(__name__)

OWNED_EVENT_DELAY = 0.3  # seconds


class Controller:
    def __init__(self, api: kube.Kube, cfg: settings.OperatorSettings) -> None:
        self.api = api
        self.cfg = cfg
        self.store = store.Store()
        self.agents = agent_reconciler.AgentReconciler(
            api=api, cache=self.store, runtime_image=cfg.runtime_image
        )
        self.agent_queue = workqueue.WorkQueue("Agent", self.agents.reconcile, workers=cfg.workers)
        self.integrations = integration_reconciler.IntegrationReconciler(api=api, cache=self.store)
        self.integration_queue = workqueue.WorkQueue(
            "Integration", self.integrations.reconcile, workers=max(4, cfg.workers // 2)
        )
        self.integrations.queue = self.integration_queue
        self.tenants = tenant_reconciler.TenantReconciler(
            api=api, cache=self.store, operator_namespace=cfg.system_namespace
        )
        self.tenant_queue = workqueue.WorkQueue("Tenant", self.tenants.reconcile, workers=4)
        self._resync: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.agent_queue.start()
        self.integration_queue.start()
        self.tenant_queue.start()
        self._resync = asyncio.create_task(self._resync_loop(), name="resync")

    async def stop(self) -> None:
        if self._resync:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
        await self.agent_queue.stop()
        await self.integration_queue.stop()
        await self.tenant_queue.stop()
        await self.api.close()

    # -- events -------------------------------------------------------------------
    def on_event(self, event: Mapping[str, Any]) -> None:
        obj = event.get("object") or {}
        kind = obj.get("kind")
        metadata = obj.get("metadata") or {}
        if not kind or "name" not in metadata:
            return
        labels = metadata.get("labels") or {}
        if kind == "Secret" and not meta.is_managed(labels):
            # Users' Secrets: remember only that they exist and their version, never data.
            obj = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": metadata["name"],
                    "namespace": metadata.get("namespace"),
                    "uid": metadata.get("uid"),
                    "resourceVersion": metadata.get("resourceVersion"),
                },
            }
        if event.get("type") == "DELETED":
            self.store.remove(kind, metadata.get("namespace"), metadata["name"])
        else:
            self.store.put(obj)
        namespace = metadata.get("namespace") or ""
        if kind == "Agent":
            if event.get("type") == "DELETED":
                self.agent_queue.forget((namespace, metadata["name"]))
            else:
                self.agent_queue.add((namespace, metadata["name"]))
            tenant = tenancy.tenant_of_namespace(self.store, namespace)
            if tenant is not None:  # its usage changed
                self.tenant_queue.add(("", tenant["metadata"]["name"]))
        elif kind == "Tenant":
            self.tenant_queue.add(("", metadata["name"]))
            namespaces = set(tenancy.tenant_namespaces(self.store, metadata["name"]))
            for key in self.store.keys("Agent"):
                if key[0] in namespaces:
                    self.agent_queue.add(key)
        elif kind == "Namespace":
            tenant = labels.get("bmad.dev/tenant")
            if tenant:
                self.tenant_queue.add(("", tenant))
        elif kind == "Integration":
            if event.get("type") == "DELETED":
                self.integration_queue.forget((namespace, metadata["name"]))
            self.integration_queue.add((namespace, metadata["name"]))
            for key in self._agents_binding(namespace, metadata["name"]):
                self.agent_queue.add(key)
        elif kind == "Secret":
            integration = labels.get("bmad.dev/integration")
            if integration:
                for key in self._agents_binding(namespace, integration):
                    self.agent_queue.add(key)
            for key in self.integrations.secret_referenced(namespace, metadata["name"]):
                self.integration_queue.add(key)
        elif kind in ("ResourceQuota", "LimitRange", "NetworkPolicy", "RoleBinding"):
            tenant_name = labels.get("bmad.dev/tenant")
            if tenant_name:  # drift in a tenant's fences: put them back
                self.tenant_queue.add(("", tenant_name))
        else:
            owner = labels.get(meta.AGENT_LABEL)
            if owner and self.store.get("Agent", namespace, owner) is not None:
                # A rollout changes a Deployment's status several times a second:
                # gather those into one pass (and one status write) per agent.
                self.agent_queue.add_after((namespace, owner), OWNED_EVENT_DELAY)

    def _agents_binding(self, namespace: str, integration: str) -> list[tuple[str, str]]:
        found = []
        for (ns, name), body in self.store.items("Agent"):
            if ns == namespace and integration in (
                (body.get("spec") or {}).get("integrations") or []
            ):
                found.append((ns, name))
        return found

    # -- resync -------------------------------------------------------------------
    async def _resync_loop(self) -> None:
        """Every Agent again every `resync_seconds`, spread out with jitter."""
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
