"""The Agent reconciler: the only code that talks to the API server about Agents.

One pass: read the Agent from the store; decide the owned objects from its spec
alone (builders); apply only those that differ from what runs; observe the
Deployment; compute the status once; write it only when it changed; post an event
when Ready flips. Every input is re-read on each pass (level-triggered), so a pass
after a crash, a missed event or a manual edit converges to the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing
from collections.abc import Hashable, Mapping
from typing import Any

import pydantic

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator import conditions, diff, errors, kube, policies, store, tenancy
from bmad_operator.builders import agent as builders
from bmad_operator.builders import integration as integration_builders
from bmad_operator.conditions import TRUE
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)

KIND = "Agent"
OWNED_KINDS = ("ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget")


APPLIED_HASH = "bmad.dev/applied-hash"


def applied_hash(obj: Mapping[str, Any]) -> str:
    """A digest of what we apply: tells our own changes apart from someone else's."""
    clean = {k: v for k, v in obj.items() if k != "metadata"}
    meta = {k: v for k, v in obj["metadata"].items() if k != "annotations"}
    notes = {
        k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k != APPLIED_HASH
    }
    text = json.dumps([clean, meta, notes], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _had_workload(previous: list[Any]) -> bool:
    """Whether an earlier pass saw the Deployment (so a missing object means deletion)."""
    available = conditions.find(previous, "Available")
    return available is not None and available.get("reason") not in (
        policies.DEPLOYMENT_MISSING,
        policies.INVALID_SPEC,
    )


class AgentReconciler:
    def __init__(self, *, api: kube.Kube, cache: store.Store, runtime_image: str) -> None:
        self.api = api
        self.cache = cache
        self.runtime_image = runtime_image

    async def reconcile(self, key: Hashable) -> None:
        namespace, name = typing.cast(tuple[str, str], key)
        await common.measured(KIND, f"{namespace}/{name}", self._reconcile(namespace, name))

    async def _reconcile(self, namespace: str, name: str) -> None:
        body = self.cache.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Gone or going: owner references let the garbage collector remove the rest.
            return
        generation = body["metadata"].get("generation")
        previous = (body.get("status") or {}).get("conditions") or []
        try:
            spec = agent_api.AgentSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as exc:
            message = common.describe_validation_error(exc)
            decided = policies.invalid_spec(message)
            await self._write_status(
                body,
                {
                    "observedGeneration": generation,
                    "conditions": conditions.merge(previous, decided, generation=generation),
                },
            )
            await self._event_on_flip(body, previous, decided[0])
            return

        tenant = tenancy.tenant_of_namespace(self.cache, namespace)
        suspended = bool(tenant and (tenant.get("spec") or {}).get("suspended"))
        integration_states = self._integration_states(namespace, spec)
        integrations_cond = policies.integrations_condition(integration_states, namespace)
        bindings = [s.name for s in integration_states if s.found]
        desired = builders.build_all(
            body,
            spec,
            image=self.runtime_image,
            bindings=bindings,
            secret_versions=self._secret_versions(namespace, bindings),
            suspended=suspended,
        )
        created: list[str] = []  # did not exist
        updated: list[str] = []  # our inputs changed (spec, bindings, image)
        drifted: list[str] = []  # someone changed or deleted what we had applied
        deployment: Mapping[str, Any] | None = None
        had_workload = _had_workload(previous)
        for obj in desired:
            kind, meta = obj["kind"], obj["metadata"]
            digest = applied_hash(obj)
            meta.setdefault("annotations", {})[APPLIED_HASH] = digest
            live = await common.observe(self.api, self.cache, kind, meta["namespace"], meta["name"])
            if diff.needs_apply(live, obj):
                try:
                    applied = await self.api.apply(obj)
                except errors.ApiError as exc:
                    if exc.retryable:
                        raise  # transient: retried with backoff
                    await self._apply_failed(body, previous, generation, kind, exc)
                    raise errors.Requeue(30.0, f"apply of {kind} refused") from None
                self.cache.put(applied)
                label = f"{kind}/{meta['name']}"
                if live is None:
                    (drifted if had_workload else created).append(label)
                elif (live["metadata"].get("annotations") or {}).get(APPLIED_HASH) == digest:
                    drifted.append(label)
                else:
                    updated.append(label)
                live = applied
            if kind == "Deployment":
                deployment = live

        desired_replicas = builders.desired_replicas(spec, suspended=suspended)
        rollout = policies.rollout(deployment)
        available, progressing = policies.workload_conditions(
            desired=desired_replicas, paused=spec.paused, observed=rollout
        )
        ready = policies.ready_condition(
            paused=spec.paused,
            integrations=integrations_cond,
            available=available,
            progressing=progressing,
            desired=desired_replicas,
            suspended_by=tenant["metadata"]["name"] if suspended and tenant else None,
        )
        decided = [ready, available, progressing, integrations_cond]
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "replicas": rollout.replicas if rollout else 0,
            "readyReplicas": rollout.ready if rollout else 0,
            "desiredReplicas": desired_replicas,
            "selector": builders.selector_string(name),
            "endpoint": builders.endpoint(body),
            "conditions": conditions.merge(previous, decided, generation=generation),
        }
        await self._write_status(body, status)

        if created:
            await self._event(body, "Normal", "Created", f"Created {', '.join(created)}.")
        if updated:
            await self._event(body, "Normal", "Updated", f"Applied {', '.join(updated)}.")
        if drifted:
            await self._event(
                body,
                "Warning",
                "DriftCorrected",
                f"Restored {', '.join(drifted)}, changed or deleted outside the operator.",
            )
        await self._event_on_flip(body, previous, ready)

    async def _apply_failed(
        self,
        body: Mapping[str, Any],
        previous: list[Any],
        generation: int | None,
        kind: str,
        exc: errors.ApiError,
    ) -> None:
        """The API server refused an owned object: say so on the Agent, retry later."""
        ready = conditions.Cond(
            "Ready",
            conditions.FALSE,
            policies.APPLY_FAILED,
            f"The API server refused the agent's {kind}: {exc.message}",
        )
        await self._write_status(
            body,
            {
                "observedGeneration": generation,
                "conditions": conditions.merge(previous, [ready], generation=generation),
            },
        )
        await self._event_on_flip(body, previous, ready)

    def _integration_states(
        self, namespace: str, spec: agent_api.AgentSpec
    ) -> list[policies.IntegrationState]:
        states = []
        for ref in spec.integrations or []:
            obj = self.cache.get("Integration", namespace, ref)
            if obj is None:
                states.append(policies.IntegrationState(ref, found=False, ready=None))
                continue
            cond = conditions.find((obj.get("status") or {}).get("conditions"), "Ready")
            states.append(
                policies.IntegrationState(
                    ref,
                    found=True,
                    ready=str(cond.get("status")) if cond else None,
                    message=str(cond.get("message", "")) if cond else "",
                )
            )
        return states

    def _secret_versions(self, namespace: str, bindings: list[str]) -> dict[str, str]:
        versions: dict[str, str] = {}
        for integration in bindings:
            secret = self.cache.get(
                "Secret", namespace, integration_builders.binding_secret_name(integration)
            )
            if secret is not None:
                versions[integration] = str(secret["metadata"].get("resourceVersion", ""))
        return versions

    async def _write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        await common.write_status(self.api, self.cache, KIND, body, status)

    async def _event_on_flip(
        self, body: Mapping[str, Any], previous: list[Any], ready: conditions.Cond
    ) -> None:
        before = conditions.find(previous, "Ready")
        if (
            before is not None
            and before.get("status") == ready.status
            and before.get("reason") == ready.reason
        ):
            return
        if ready.status == TRUE:
            await self._event(body, "Normal", "Ready", ready.message)
        elif ready.reason == policies.INVALID_SPEC:
            await self._event(body, "Warning", "InvalidSpec", ready.message)
        elif ready.reason in (policies.ROLLING_OUT, policies.DEPLOYMENT_MISSING):
            if before is not None and before.get("status") == TRUE:
                await self._event(body, "Normal", "RollingOut", ready.message)
        else:
            await self._event(body, "Warning", "NotReady", f"{ready.reason}: {ready.message}")

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        await common.post_event(self.api, body, type_, reason, message)
