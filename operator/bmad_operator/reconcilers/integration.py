"""The Integration reconciler: check the service with its real client, publish a binding.

A check runs when the Integration is new or its spec changed, when its credentials
Secret changed, and on a timer: `checkIntervalSeconds` with jitter while healthy, a
shorter, growing backoff while failing. Our own status writes come back as watch
events; they do not trigger checks, because nothing the check depends on has changed.

Users' Secrets are not watched (the operator watches only the Secrets it manages,
selected by label on the API server): each pass reads the credentials Secret by name,
and a new resourceVersion means a check. Passes come at least with the resync
(`BMAD_OPERATOR_RESYNC_SECONDS`, 60 s by default), so a rotated key is noticed within
that period.

On success the binding Secret `<name>-binding` (servicebinding.io layout, owned by
the Integration) is applied; on failure the last good binding stays, so agents keep
working credentials while someone fixes the new ones.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import random
import time
import typing
from collections.abc import Hashable, Mapping
from typing import Any

import pydantic

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import checks, egress
from bmad_operator import conditions, kube, settings, store, watching, workqueue
from bmad_operator.builders import integration as builders
from bmad_operator.conditions import Cond
from bmad_operator.policies import integration as policy
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)

KIND = "Integration"


class IntegrationReconciler:
    def __init__(
        self,
        *,
        api: kube.Kube,
        cache: store.Store,
        check_timeout: float = 10.0,
        egress_policy: egress.Policy | None = None,
    ) -> None:
        self.api = api
        self.cache = cache
        self.check_timeout = check_timeout
        # Where checks may connect; from BMAD_OPERATOR_EGRESS_* unless the caller says.
        self.egress_policy = (
            egress_policy if egress_policy is not None else settings.load().egress_policy()
        )
        self.queue: workqueue.WorkQueue | None = None
        self._memory: dict[tuple[str, str], policy.CheckMemory] = {}

    async def reconcile(self, key: Hashable) -> None:
        namespace, name = typing.cast(tuple[str, str], key)
        await common.measured(KIND, f"{namespace}/{name}", self._reconcile(namespace, name))

    def watches(self) -> list[watching.Watch]:
        """The events that bring an Integration back (kubebuilder's SetupWithManager)."""
        return [
            # deleted: its check memory goes in one last pass
            watching.primary(KIND, on_delete=watching.FORGET_AND_QUEUE),
        ]

    async def _reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        body = self.cache.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self._memory.pop(key, None)
            return
        generation = body["metadata"].get("generation")
        status = body.get("status") or {}
        previous = status.get("conditions") or []
        try:
            spec = integration_api.IntegrationSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as exc:
            msg = common.describe_validation_error(exc)
            ready = policy.invalid_spec(msg)
            await common.write_conditions(self.api, self.cache, KIND, body, [ready])
            await self._event_on_flip(body, previous, ready)
            return

        secret_name = spec.secret_ref.name if spec.secret_ref else None
        # Read by name on every pass (one GET): users' Secrets are not watched.
        secret = await self.api.get("Secret", namespace, secret_name) if secret_name else None
        secret_version = str(secret["metadata"].get("resourceVersion")) if secret else None
        memory = self._memory.get(key)
        now = time.monotonic()
        if memory is not None and not policy.check_due(
            memory, generation=generation, secret_version=secret_version, now=now
        ):
            self._schedule(key, memory.due - now)
            return  # nothing changed and not due: this was our own status write

        secret_found = secret_name is None or secret is not None
        secret_data: dict[str, bytes] | None = None
        if secret is not None:
            secret_data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        result = await checks.check_integration(
            spec,
            secret_data,
            secret_found=secret_found,
            timeout=self.check_timeout,
            policy=self.egress_policy,
        )
        binding_name = status.get("bindingSecretName")
        conflict: str | None = None
        if result.ok:
            data = checks.binding_data(spec, secret_data)
            wanted = builders.binding_secret(body, spec.type, data)
            wanted_name = wanted["metadata"]["name"]
            live = await common.observe(self.api, self.cache, "Secret", namespace, wanted_name)
            if live is not None and not common.controlled_by(live, body["metadata"]["uid"]):
                # Someone else's Secret with the binding's name: never overwritten or adopted.
                conflict = f"Secret/{wanted_name}"
            else:
                await common.ensure(self.api, self.cache, wanted)
                binding_name = wanted_name
        ready = (
            policy.name_conflict(conflict, namespace)
            if conflict
            else policy.ready_condition(result, spec)
        )

        failures = policy.failures_after(memory, ok=result.ok and conflict is None)
        jitter = random.uniform(0.9, 1.1)  # noqa: S311 - spreads checks, not crypto
        delay = policy.next_delay(float(spec.check_interval_seconds), failures, jitter=jitter)
        self._memory[key] = policy.CheckMemory(generation, secret_version, now + delay, failures)
        new_status: dict[str, Any] = {
            "observedGeneration": generation,
            "lastCheckTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "latencyMs": result.latency_ms,
            "conditions": conditions.merge(
                previous,
                [ready, *filter(None, [policy.encrypted_condition(result, spec)])],
                generation=generation,
            ),
        }
        if result.server_version:
            new_status["serverVersion"] = result.server_version
        if binding_name:
            new_status["bindingSecretName"] = binding_name
        await self._write_status(body, new_status)
        await self._event_on_flip(body, previous, ready)
        self._schedule(key, delay)

    def _schedule(self, key: tuple[str, str], delay: float) -> None:
        if self.queue is not None:
            self.queue.add_after(key, policy.requeue_delay(delay))

    async def _write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        await common.write_status(self.api, self.cache, KIND, body, status)

    async def _event_on_flip(
        self, body: Mapping[str, Any], previous: list[Any], ready: Cond
    ) -> None:
        event = policy.ready_event(conditions.find(previous, "Ready"), ready)
        if event is not None:
            await common.post_event(self.api, body, event)
