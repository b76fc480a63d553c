"""The Agent reconciler: the only code that talks to the API server about Agents.

One pass: read the Agent from the store; decide the owned objects from its spec
alone (builders); apply only those that differ from what runs; observe the
Deployment; compute the status once; write it only when it changed; post an event
when Ready flips. Every input is re-read on each pass (level-triggered), so a pass
after a crash, a missed event or a manual edit converges to the same result.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import typing
from collections.abc import Hashable, Mapping
from typing import Any, Protocol

import pydantic

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_integrations.usage import acl as usage_acl
from bmad_operator import conditions, diff, errors, kube, store, tenancy, watching
from bmad_operator.autoscaling import keda
from bmad_operator.autoscaling import report as scaling_report
from bmad_operator.builders import agent as builders
from bmad_operator.builders import integration as integration_builders
from bmad_operator.builders import meta
from bmad_operator.policies import agent as policy
from bmad_operator.policies import payments as payment_policy
from bmad_operator.policies import usage as usage_policy
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)

KIND = "Agent"
OWNED_KINDS = ("ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget")
# engine: keda; an owned object only where KEDA's CRD exists.
SCALED_OBJECT = "ScaledObject"
# A rollout changes a Deployment's status several times a second: an owned object's
# change waits this long, so those events become one pass (and one status write).
OWNED_EVENT_DELAY = 0.3  # seconds


APPLIED_HASH = "bmad.dev/applied-hash"


def applied_hash(obj: Mapping[str, Any]) -> str:
    """A digest of what we apply: tells our own changes apart from someone else's."""
    clean = {k: v for k, v in obj.items() if k != "metadata"}
    labels_and_names = {k: v for k, v in obj["metadata"].items() if k != "annotations"}
    notes = {
        k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k != APPLIED_HASH
    }
    text = json.dumps([clean, labels_and_names, notes], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ScalingSource(Protocol):
    """The autoscaler's latest report on an Agent (``autoscaling.autoscaler.Autoscaler``)."""

    def report(self, namespace: str, name: str) -> scaling_report.Report | None: ...


class AgentReconciler:
    def __init__(
        self,
        *,
        api: kube.Kube,
        cache: store.Store,
        runtime_image: str,
        scaling: ScalingSource | None = None,
        prometheus_url: str = "",
        usage: common.UsageSource | None = None,
    ) -> None:
        self.api = api
        self.cache = cache
        self.runtime_image = runtime_image
        self.scaling = scaling
        self.prometheus_url = prometheus_url
        # The usage ledger, when the operator meters usage (docs/billing.md).
        self.usage = usage

    def watches(self) -> list[watching.Watch]:
        """The events that bring an Agent back (kubebuilder's SetupWithManager)."""
        return [
            watching.primary(KIND, on_delete=watching.FORGET),
            *(
                watching.owned(
                    kind,
                    owner_kind=KIND,
                    label=meta.AGENT_LABEL,
                    cache=self.cache,
                    delay=OWNED_EVENT_DELAY,
                )
                for kind in (*OWNED_KINDS, SCALED_OBJECT)
            ),
            # an HPA appeared or went: a conflict with the Agent's autoscaling, or none
            watching.mapped("HorizontalPodAutoscaler", self._agent_scaled_by),
            # suspended or resumed, its namespaces changed
            watching.mapped("Tenant", self._agents_of_tenant),
            # its tenant label changed: the agents' BMAD_TENANT follows
            watching.mapped("Namespace", self._agents_in_namespace),
            # an Integration it binds was created, checked, deleted
            watching.mapped("Integration", self._agents_binding_integration),
            # a binding Secret changed: the pods roll
            watching.mapped("Secret", self._agents_binding_secret),
        ]

    def _agents_of_tenant(self, event: watching.WatchEvent) -> list[watching.Request]:
        namespaces = set(tenancy.tenant_namespaces(self.cache, event.name))
        return [watching.Request(key) for key in self.cache.keys(KIND) if key[0] in namespaces]

    def _agents_in_namespace(self, event: watching.WatchEvent) -> list[watching.Request]:
        return [watching.Request(key) for key in self.cache.keys(KIND) if key[0] == event.name]

    def _agent_scaled_by(self, event: watching.WatchEvent) -> list[watching.Request]:
        target = (event.body.get("spec") or {}).get("scaleTargetRef") or {}
        name = target.get("name")
        if name and self.cache.get(KIND, event.namespace, str(name)) is not None:
            return [watching.Request((event.namespace, str(name)))]
        return []

    def _agents_binding_integration(self, event: watching.WatchEvent) -> list[watching.Request]:
        return self._agents_binding(event.namespace, event.name)

    def _agents_binding_secret(self, event: watching.WatchEvent) -> list[watching.Request]:
        integration = event.labels.get(meta.INTEGRATION_LABEL)
        return self._agents_binding(event.namespace, integration) if integration else []

    def _agents_binding(self, namespace: str, integration: str) -> list[watching.Request]:
        return [
            watching.Request(key)
            for key, body in self.cache.items(KIND)
            if key[0] == namespace
            and integration in ((body.get("spec") or {}).get("integrations") or [])
        ]

    async def reconcile(self, key: Hashable) -> None:
        namespace, name = typing.cast(tuple[str, str], key)
        await common.measured(KIND, f"{namespace}/{name}", self._reconcile(namespace, name))

    async def _reconcile(self, namespace: str, name: str) -> None:
        body = self.cache.get(KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Gone or going: owner references let the garbage collector remove the rest.
            return
        ns_obj = self.cache.get("Namespace", None, namespace)
        if ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp"):
            # The namespace goes, and the Agent with it: the deletion removes its objects
            # first (each an event that brings it back), and the API server refuses new
            # objects in a terminating namespace, so re-creating them would only churn.
            return
        generation = body["metadata"].get("generation")
        previous = (body.get("status") or {}).get("conditions") or []
        raw_spec, ignored_env = builders.split_reserved_env(body.get("spec") or {})
        try:
            spec = agent_api.AgentSpec.model_validate(raw_spec)
        except pydantic.ValidationError as exc:
            message = common.describe_validation_error(exc)
            decided = policy.invalid_spec(message)
            await common.write_conditions(self.api, self.cache, KIND, body, decided)
            await self._event_on_flip(body, previous, decided[0])
            return

        tenant_name = tenancy.tenant_name_of_namespace(self.cache, namespace)
        tenant = self.cache.get("Tenant", None, tenant_name) if tenant_name else None
        # spec.suspended, or the suspension payments put in the Tenant's status.
        suspended = bool(
            tenant and (tenant.get("spec") or {}).get("suspended")
        ) or payment_policy.suspends(tenant)
        integration_states = self._integration_states(namespace, spec)
        integrations_cond = policy.integrations_condition(
            integration_states, namespace, auth_mode=builders.auth_mode(spec)
        )
        bindings = [s.name for s in integration_states if s.found]
        instructions, instructions_problem = await self._instructions(namespace, spec)
        ledger_url, ledger_conflict = await self._ledger_writer(
            body, spec, tenant_name or namespace
        )
        desired = builders.build_all(
            body,
            spec,
            image=self.runtime_image,
            bindings=bindings,
            secret_versions=self._secret_versions(namespace, bindings),
            suspended=suspended,
            tenant=tenant_name,
            instructions_version=(
                str(instructions["metadata"].get("resourceVersion", "")) if instructions else None
            ),
            usage_ledger_url=ledger_url,
            usage_spool=self.usage is None or self.usage.spool,
        )
        # The store holds every object of ours (the watches select on our label); a miss
        # is absent, or someone else's. It is created by an apply that only creates
        # (`apply_new`), and only when that is refused (the name is taken) does a GET
        # tell a foreign object from one of ours the store has not seen yet.
        lives = [self.cache.get(obj["kind"], namespace, obj["metadata"]["name"]) for obj in desired]
        uid = body["metadata"].get("uid", "")
        foreign = [
            f"{obj['kind']}/{obj['metadata']['name']}"
            for obj, live in zip(desired, lives, strict=True)
            if live is not None and not common.controlled_by(live, uid)
        ]
        if ledger_conflict:
            foreign.append(ledger_conflict)
        if foreign:
            await self._name_conflict(body, previous, foreign, namespace)
            return

        created: list[str] = []  # did not exist
        updated: list[str] = []  # our inputs changed (spec, bindings, image)
        drifted: list[str] = []  # someone changed or deleted what we had applied
        deployment: Mapping[str, Any] | None = None
        had_workload = policy.had_workload(previous)
        # The Deployment last: its pods start only once every object they use is known to
        # be ours (the pass stops at the first name it finds taken by someone else).
        in_order = sorted(
            zip(desired, lives, strict=True), key=lambda d: d[0]["kind"] == "Deployment"
        )
        for obj, observed in in_order:
            live = observed
            kind, obj_meta = obj["kind"], obj["metadata"]
            label = f"{kind}/{obj_meta['name']}"
            digest = applied_hash(obj)
            obj_meta.setdefault("annotations", {})[APPLIED_HASH] = digest
            applied: dict[str, Any] | None = None
            try:
                if live is None:
                    try:
                        applied = await self.api.apply_new(obj)
                    except errors.ApiError as exc:
                        if exc.status != 409:
                            raise
                        # The name is taken: by us (the store lags) or by someone else.
                        live = await common.observe(
                            self.api, self.cache, kind, namespace, obj_meta["name"]
                        )
                        if live is None:
                            raise  # gone again meanwhile: retried with backoff
                        if not common.controlled_by(live, uid):
                            await self._name_conflict(body, previous, [label], namespace)
                            return
                if applied is None and diff.needs_apply(live, obj):
                    applied = await self.api.apply(obj)
            except errors.ApiError as exc:
                if exc.retryable:
                    raise  # transient: retried with backoff
                await self._apply_failed(body, previous, kind, exc)
                raise errors.Requeue(30.0, f"apply of {kind} refused") from None
            if applied is not None:
                self.cache.put(applied)
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
        rollout = policy.rollout(deployment)
        available, progressing = policy.workload_conditions(
            desired=desired_replicas, paused=spec.paused, observed=rollout
        )
        ready = policy.ready_condition(
            paused=spec.paused,
            integrations=integrations_cond,
            available=available,
            progressing=progressing,
            desired=desired_replicas,
            suspended_by=tenant["metadata"]["name"] if suspended and tenant else None,
            problems=[instructions_problem, policy.reserved_env_problem(ignored_env)],
        )
        # The autoscaler's report joins this pass's one status write (see
        # autoscaling.report): None keeps what the status shows until its first one.
        scaling = await self._scaling(body, spec)
        kept = previous
        if scaling is not None:
            kept = [c for c in previous if c.get("type") not in scaling_report.CONDITION_TYPES]
        # Until the ledger is read (a takeover), BudgetExhausted stays as it is shown.
        budget_cond = (
            usage_policy.budget_condition(
                self.usage.budget_of(tenant_name or namespace), tenant=tenant_name or namespace
            )
            if self.usage is not None and self.usage.loaded
            else None
        )
        decided = [
            ready,
            available,
            progressing,
            integrations_cond,
            *(scaling.conditions if scaling else ()),
            *((budget_cond,) if budget_cond else ()),
        ]
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "replicas": rollout.replicas if rollout else 0,
            "readyReplicas": rollout.ready if rollout else 0,
            "desiredReplicas": desired_replicas,
            "selector": builders.selector_string(name),
            "endpoint": builders.endpoint(body),
            "conditions": conditions.merge(kept, decided, generation=generation),
        }
        shown = (body.get("status") or {}).get("autoscaling")
        if scaling is not None and scaling.autoscaling != shown:
            status["autoscaling"] = scaling_report.status_patch(shown, scaling.autoscaling)
        used = self.usage.usage_of_agent(namespace, name) if self.usage is not None else None
        if used is not None:
            status["usage"] = usage_policy.status_usage(used)
        await self._write_status(body, status)
        if budget_cond is not None:
            budget_event = usage_policy.budget_event(previous, budget_cond)
            if budget_event is not None:
                await common.post_event(self.api, body, budget_event)

        for event in policy.apply_events(created=created, updated=updated, drifted=drifted):
            await common.post_event(self.api, body, event)
        await self._event_on_flip(body, previous, ready)

    async def _name_conflict(
        self, body: Mapping[str, Any], previous: list[Any], foreign: list[str], namespace: str
    ) -> None:
        """Never adopt what someone else made. Such objects carry none of our labels, so no
        watch event says when they go: the resync brings the Agent back."""
        ready = policy.name_conflict(foreign, namespace)
        await common.write_conditions(self.api, self.cache, KIND, body, [ready])
        await self._event_on_flip(body, previous, ready)

    async def _ledger_writer(
        self, body: Mapping[str, Any], spec: agent_api.AgentSpec, tenant: str
    ) -> tuple[str | None, str | None]:
        """The agent's writer on the ledger's Redis, its password in a Secret the agent's
        pods mount; the URL its runtime gets (None: usage is not metered), and the
        Secret's name when someone else's Secret has it (a name conflict).

        The password is made once and kept in the Secret (owned by the Agent); the ACL
        user is set from it. A platform Redis that is down does not stop the pass: the
        runtime then refuses to answer without a record, and a later pass sets the user.
        """
        if self.usage is None:
            return None, None
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        secret_name = contract.usage_secret_name(name)
        live = await common.observe(self.api, self.cache, "Secret", namespace, secret_name)
        password = _password_of(live) if live is not None else None
        if live is not None and not common.controlled_by(live, body["metadata"].get("uid", "")):
            return None, f"Secret/{secret_name}"
        if password is None:
            applied = await self.api.apply(
                builders.usage_secret(body, spec, usage_acl.new_password())
            )
            self.cache.put(applied)
            password = _password_of(applied)
        if password is None:
            return None, None
        try:
            await self.usage.ensure_writer(
                namespace=namespace, agent=name, tenant=tenant, password=password
            )
        except Exception as exc:  # the platform Redis: the next pass tries again
            log.warning("the usage writer of Agent %s/%s is not set: %s", namespace, name, exc)
        return self.usage.agent_url, None

    async def _scaling(
        self, body: Mapping[str, Any], spec: agent_api.AgentSpec
    ) -> scaling_report.Report | None:
        """What the status shows of autoscaling; None: leave it as it is."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if scaling_report.keda_mode(spec):
            return await self._keda(body, spec)
        await self._drop_scaled_object(namespace, name)
        if not scaling_report.autoscaled(spec):
            return scaling_report.NOT_AUTOSCALED
        return self.scaling.report(namespace, name) if self.scaling else None

    async def _keda(
        self, body: Mapping[str, Any], spec: agent_api.AgentSpec
    ) -> scaling_report.Report:
        """engine: keda: apply the Agent's ScaledObject and show what KEDA says of it."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if not self.prometheus_url:
            return scaling_report.keda(name)
        scalers = scaling_report.foreign_scalers(
            name,
            [o for (ns, _), o in self.cache.items("HorizontalPodAutoscaler") if ns == namespace],
            [o for (ns, _), o in self.cache.items(SCALED_OBJECT) if ns == namespace],
        )
        if scalers:
            return scaling_report.keda(name, scalers=scalers, prometheus_url=self.prometheus_url)
        rendered = keda.scaled_object(body, spec, server_address=self.prometheus_url)
        try:
            live = await common.ensure(self.api, self.cache, rendered.scaled_object)
        except errors.ApiError as exc:
            if exc.not_found:  # the API server serves no scaledobjects.keda.sh
                return scaling_report.keda(name, missing=True, prometheus_url=self.prometheus_url)
            if exc.retryable:
                raise
            return scaling_report.keda(
                name, refused=exc.message, prometheus_url=self.prometheus_url
            )
        return scaling_report.keda(
            name, live=live, caveats=rendered.caveats, prometheus_url=self.prometheus_url
        )

    async def _drop_scaled_object(self, namespace: str, name: str) -> None:
        """The ScaledObject of an earlier engine: keda, which KEDA would go on acting on."""
        live = self.cache.get(SCALED_OBJECT, namespace, name)
        owners = (live or {}).get("metadata", {}).get("ownerReferences") or []
        if live is not None and any(o.get("kind") == KIND for o in owners):
            await self.api.delete(SCALED_OBJECT, namespace, name)
            self.cache.remove(SCALED_OBJECT, namespace, name)

    async def _apply_failed(
        self,
        body: Mapping[str, Any],
        previous: list[Any],
        kind: str,
        exc: errors.ApiError,
    ) -> None:
        """The API server refused an owned object: say so on the Agent, retry later."""
        ready = policy.apply_failed(kind, exc.message)
        await common.write_conditions(self.api, self.cache, KIND, body, [ready])
        await self._event_on_flip(body, previous, ready)

    def _integration_states(
        self, namespace: str, spec: agent_api.AgentSpec
    ) -> list[policy.IntegrationState]:
        states = []
        for ref in spec.integrations or []:
            obj = self.cache.get("Integration", namespace, ref)
            if obj is None:
                states.append(policy.IntegrationState(ref, found=False, ready=None))
                continue
            cond = conditions.find((obj.get("status") or {}).get("conditions"), "Ready")
            states.append(
                policy.IntegrationState(
                    ref,
                    found=True,
                    ready=str(cond.get("status")) if cond else None,
                    message=str(cond.get("message", "")) if cond else "",
                    type=str((obj.get("spec") or {}).get("type") or "") or None,
                )
            )
        return states

    async def _instructions(
        self, namespace: str, spec: agent_api.AgentSpec
    ) -> tuple[Mapping[str, Any] | None, conditions.Cond | None]:
        """The ConfigMap of spec.instructionsFrom, and what is wrong with it if anything.

        Users' ConfigMaps are not watched (only ours are), so this is one GET per pass
        of an Agent that names one: a new version is seen at the next pass (a rollout's
        events, or the periodic resync) and rolls the pods.
        """
        ref = spec.instructions_from
        if ref is None:
            return None, None
        live = await self.api.get("ConfigMap", namespace, ref.name)
        problem = policy.instructions_problem(
            config_map=ref.name, key=ref.key, live=live, namespace=namespace
        )
        return live, problem

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
        event = policy.ready_event(conditions.find(previous, "Ready"), ready)
        if event is not None:
            await common.post_event(self.api, body, event)


def _password_of(secret: Mapping[str, Any]) -> str | None:
    encoded = (secret.get("data") or {}).get(contract.USAGE_SECRET_KEY)
    if not encoded:
        return None
    try:
        password = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password if len(password) >= 16 else None
