"""The Integration reconciler: check the service with its real client, publish a binding.

A check runs when the Integration is new or its spec changed, when its credentials
Secret changed (seen through the Secret watch, not by polling), and on a timer:
`checkIntervalSeconds` with jitter while healthy, a shorter, growing backoff while
failing. Our own status writes come back as watch events; they do not trigger
checks, because nothing the check depends on has changed.

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
from dataclasses import dataclass
from typing import Any

import pydantic

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import base as ibase
from bmad_integrations import checks
from bmad_operator import conditions, kube, store, workqueue
from bmad_operator.builders import integration as builders
from bmad_operator.conditions import FALSE, TRUE, Cond
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)

KIND = "Integration"
MIN_RETRY_SECONDS = 5.0


@dataclass
class CheckMemory:
    generation: int | None
    secret_version: str | None
    due: float
    failures: int


def next_delay(interval: float, failures: int) -> float:
    """When to check again: the interval while healthy, a growing backoff while failing."""
    if failures <= 0:
        return interval * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not crypto
    backoff = min(interval, MIN_RETRY_SECONDS * 2.0 ** (failures - 1))
    return backoff * random.uniform(0.9, 1.1)  # noqa: S311


class IntegrationReconciler:
    def __init__(self, *, api: kube.Kube, cache: store.Store, check_timeout: float = 10.0) -> None:
        self.api = api
        self.cache = cache
        self.check_timeout = check_timeout
        self.queue: workqueue.WorkQueue | None = None
        self._memory: dict[tuple[str, str], CheckMemory] = {}

    async def reconcile(self, key: Hashable) -> None:
        namespace, name = typing.cast(tuple[str, str], key)
        await common.measured(KIND, f"{namespace}/{name}", self._reconcile(namespace, name))

    def secret_referenced(self, namespace: str, secret: str) -> list[tuple[str, str]]:
        found = []
        for (ns, name), body in self.cache.items(KIND):
            ref = ((body.get("spec") or {}).get("secretRef") or {}).get("name")
            if ns == namespace and ref == secret:
                found.append((ns, name))
        return found

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
            ready = Cond("Ready", FALSE, ibase.Reason.INVALID_CONFIGURATION, msg)
            await self._write_status(
                body,
                {
                    "observedGeneration": generation,
                    "conditions": conditions.merge(previous, [ready], generation=generation),
                },
            )
            await self._event_on_flip(body, previous, ready)
            return

        secret_name = spec.secret_ref.name if spec.secret_ref else None
        secret_meta = self.cache.get("Secret", namespace, secret_name) if secret_name else None
        secret_version = (
            str(secret_meta["metadata"].get("resourceVersion")) if secret_meta else None
        )
        memory = self._memory.get(key)
        now = time.monotonic()
        if (
            memory is not None
            and memory.generation == generation
            and memory.secret_version == secret_version
            and now < memory.due
        ):
            self._schedule(key, memory.due - now)
            return  # nothing changed and not due: this was our own status write

        secret_data: dict[str, bytes] | None = None
        secret_found = secret_name is None
        if secret_name:
            secret = await self.api.get("Secret", namespace, secret_name)
            if secret is not None:
                secret_found = True
                secret_version = str(secret["metadata"].get("resourceVersion"))
                secret_data = {
                    k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()
                }
        result = await checks.check_integration(
            spec, secret_data, secret_found=secret_found, timeout=self.check_timeout
        )
        binding_name = status.get("bindingSecretName")
        if result.ok:
            data = checks.binding_data(spec, secret_data)
            wanted = builders.binding_secret(body, spec.type, data)
            await common.ensure(self.api, self.cache, wanted)
            binding_name = wanted["metadata"]["name"]
            ready = Cond("Ready", TRUE, ibase.Reason.CHECKED, result.message or _ok_message(spec))
        else:
            ready = Cond("Ready", FALSE, str(result.reason), result.message)

        failures = 0 if result.ok else (memory.failures + 1 if memory else 1)
        delay = next_delay(float(spec.check_interval_seconds), failures)
        self._memory[key] = CheckMemory(generation, secret_version, now + delay, failures)
        new_status: dict[str, Any] = {
            "observedGeneration": generation,
            "lastCheckTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "latencyMs": result.latency_ms,
            "conditions": conditions.merge(previous, [ready], generation=generation),
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
            self.queue.add_after(key, max(delay, 0.5))

    async def _write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        await common.write_status(self.api, self.cache, KIND, body, status)

    async def _event_on_flip(
        self, body: Mapping[str, Any], previous: list[Any], ready: Cond
    ) -> None:
        before = conditions.find(previous, "Ready")
        if before is not None and before.get("status") == ready.status:
            return  # an event only when Ready flips
        if before is None and ready.status == TRUE:
            reason, type_ = "Checked", "Normal"
        elif ready.status == TRUE:
            reason, type_ = "Recovered", "Normal"
        else:
            reason, type_ = str(ready.reason), "Warning"
        await common.post_event(self.api, body, type_, reason, ready.message)


def _ok_message(spec: integration_api.IntegrationSpec) -> str:
    return f"The {spec.type} service answered an authenticated request."
