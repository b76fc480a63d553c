"""The Workflow reconciler: runs the pure engine against the cluster and the task buses.

One pass, like the Agent's: observe (the Workflow, the Agents and Integrations of its
namespace, the results of its running attempts on their Agents' buses), decide
(`workflows.engine.decide`, pure), act (hold the finalizer, dispatch, cancel, send the
notifications), hand the status and the decided Events to the Workflow's background
writer (`writeback`: written after the pass, coalesced with later passes' while a write
is in flight; the next pass starts from the status decided in memory), and ask to be
called again when the engine wants to look again (a retry due, an attempt's deadline)
or, while attempts run, after `poll_seconds`. A stored result wakes the Workflow at once through
the bus's ``finished`` announcements (`workflows.bus`).

Durable by construction: everything the engine needs is in the status, task ids are
deterministic and the bus enqueues an id once, so a pass repeated after a crash
dispatches nothing twice and never re-runs a finished step. Tasks are dispatched before
the status that records them is written: a crash in between (the stored status may lag
a few passes behind) dispatches the same ids again on restart (harmless; a task that
already has its result queues the Workflow again at once), never leaves a recorded
attempt that was not sent.

Deleting a Workflow: the finalizer ``bmad.dev/workflow-cancel``, held while the run has
work out, lets one last pass cancel every outstanding task (a ``cancelled`` result under
its id, which consumers check before running) before the object goes. A run that ended
releases the finalizer at once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import typing
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import pydantic

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import common as api_common
from bmad_crds.v1alpha1 import workflow as api
from bmad_integrations import egress
from bmad_integrations import email as email_mod
from bmad_operator import errors, events, kube, settings, store, tenancy, watching, workqueue
from bmad_operator.builders import integration as integration_builders
from bmad_operator.builders import meta
from bmad_operator.policies import workflow as policy
from bmad_operator.reconcilers import common, writeback
from bmad_operator.workflows import bus as bus_mod
from bmad_operator.workflows import engine, tasks, wire

log = logging.getLogger(__name__)

KIND = "Workflow"
FINALIZER = "bmad.dev/workflow-cancel"
EVENT_NOTIFICATION_FAILED = "NotificationFailed"
Key = tuple[str, str]


def bus_identity(cache: store.Store, namespace: str, agent: str) -> tuple[str, str]:
    """(tenant, agent key) of ``agent``'s bus keys, as its runtime uses them: the tenant
    its pods get in BMAD_TENANT (the namespace's Tenant, else the namespace) and the
    contract's agent key (``<namespace>.<name>`` inside a Tenant)."""
    tenant = tenancy.tenant_name_of_namespace(cache, namespace) or namespace
    return tenant, contract.agent_key(name=agent, namespace=namespace, tenant=tenant)


def _decoded(secret: Mapping[str, Any] | None) -> dict[str, str]:
    data = (secret or {}).get("data") or {}
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


class WorkflowReconciler:
    def __init__(
        self,
        *,
        api: kube.Kube,
        cache: store.Store,
        bus: bus_mod.WorkflowBus | None = None,
        egress_policy: egress.Policy | None = None,
        poll_seconds: float = 10.0,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.api = api
        self.cache = cache
        self.bus = bus if bus is not None else bus_mod.WorkflowBus(on_finished=self.on_finished)
        self.egress_policy = (
            egress_policy if egress_policy is not None else settings.load().egress_policy()
        )
        self.poll_seconds = poll_seconds
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.queue: workqueue.WorkQueue | None = None
        self.writes = writeback.StatusWriter(api=api, cache=cache, kind=KIND)
        self._by_uid: dict[str, Key] = {}

    # --- what wakes a Workflow -------------------------------------------------------

    def watches(self) -> list[watching.Watch]:
        """The events that bring a Workflow back (kubebuilder's SetupWithManager)."""
        return [
            # deleted: the finalizer's pass already ran; drop its timers
            watching.primary(KIND, on_delete=watching.FORGET),
            # an Agent a step names was created, deleted or changed its Integrations
            watching.mapped("Agent", self._naming_agent),
            # an Integration of its namespace (a task bus, the artifacts, the mail) changed
            watching.mapped("Integration", self._in_namespace),
            # a binding Secret was published: the Redis URL of a task bus
            watching.mapped("Secret", self._binding_secret),
            # its tenant label changed: the bus keys of its Agents follow (`bus_identity`)
            watching.mapped("Namespace", self._in_namespace_named),
        ]

    def _running(self, namespace: str) -> list[tuple[Key, Mapping[str, Any]]]:
        return [
            (key, body)
            for key, body in self.cache.items(KIND)
            if key[0] == namespace
            and (body.get("status") or {}).get("phase") not in engine.TERMINAL
        ]

    def _naming_agent(self, event: watching.WatchEvent) -> list[watching.Request]:
        return [
            watching.Request(key)
            for key, body in self._running(event.namespace)
            if any(
                step.get("agent") == event.name
                for step in (body.get("spec") or {}).get("steps") or []
            )
        ]

    def _in_namespace(self, event: watching.WatchEvent) -> list[watching.Request]:
        return [watching.Request(key) for key, _ in self._running(event.namespace)]

    def _in_namespace_named(self, event: watching.WatchEvent) -> list[watching.Request]:
        return [watching.Request(key) for key, _ in self._running(event.name)]

    def _binding_secret(self, event: watching.WatchEvent) -> list[watching.Request]:
        if not event.labels.get(meta.INTEGRATION_LABEL):
            return []
        return self._in_namespace(event)

    def on_finished(self, tenant: str, agent: str, task_id: str) -> None:
        """A result was stored: queue the Workflow whose task it is, if it is ours."""
        ref = tasks.parse_task_id(task_id)
        key = self._by_uid.get(ref.uid) if ref is not None else None
        if key is not None and self.queue is not None:
            self.queue.add(key)

    # --- one pass --------------------------------------------------------------------

    async def reconcile(self, key: Hashable) -> None:
        namespace, name = typing.cast(Key, key)
        await common.measured(KIND, f"{namespace}/{name}", self._reconcile(namespace, name))

    async def _reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        found = self.cache.get(KIND, namespace, name)
        if found is None:
            self._by_uid = {u: k for u, k in self._by_uid.items() if k != key}
            self.writes.forget(key)
            return
        metadata = found["metadata"]
        # The status the previous pass decided, while its write is still on the way.
        decided = self.writes.decided(key, str(metadata.get("uid") or ""))
        body: Mapping[str, Any] = found if decided is None else {**found, "status": decided}
        deleting = bool(metadata.get("deletionTimestamp"))
        held = FINALIZER in (metadata.get("finalizers") or [])
        if deleting and not held:
            return  # going, and nothing of ours to do
        self._by_uid[str(metadata.get("uid"))] = key
        try:
            workflow = api.Workflow.model_validate(body)
        except pydantic.ValidationError as exc:
            await self.writes.flush(key)
            body = self.cache.get(KIND, namespace, name) or body
            if deleting:
                await self._release(body)
                return
            message = common.describe_validation_error(exc)
            await common.write_conditions(
                self.api, self.cache, KIND, body, policy.invalid_spec(message)
            )
            return
        before = workflow.status.phase if workflow.status else None
        if before in engine.TERMINAL:
            if held:
                await self.writes.flush(key)
                await self._release(self.cache.get(KIND, namespace, name) or body)
            return

        # observe
        bound = self._agents(namespace)
        integrations = self._integrations(namespace)
        problems = policy.problems(workflow.spec, agents=bound, integrations=integrations)
        routes = self._routes(namespace, bound, integrations)
        agent_of = {step.id: step.agent for step in workflow.spec.steps}
        uid = workflow.metadata.uid or ""
        stored = await self.bus.results(
            self._wanted(tasks.outstanding(uid, workflow.status), agent_of, routes)
        )
        results = {task_id: wire.result(found) for task_id, found in stored.items()}

        # decide
        decision = engine.decide(
            workflow,
            results=results,
            now=self.clock(),
            agents=set(bound),
            deleting=deleting,
            problems=problems,
        )
        ending = decision.status.phase in engine.TERMINAL

        # act
        if not held and not ending and tasks.outstanding(uid, decision.status):
            body = await self._hold(body)
        await self._dispatch(workflow, decision, routes)
        await self._cancel(decision, routes, agent_of, deleting=deleting)
        failed_events = await self._notify(workflow, decision, namespace)
        # The status and the Events are written in the background (`writeback`): the
        # next pass may start from this decision at once. Tasks went out first, so the
        # stored status never records an attempt that was not sent.
        posted = [events.Event(e.type, e.reason, e.message) for e in decision.events]  # type: ignore[arg-type]
        self.writes.submit(
            key, body, api_common.to_json(decision.status), [*posted, *failed_events]
        )
        if ending or deleting:
            await self.writes.flush(key)
            latest = self.cache.get(KIND, namespace, name) or body
            if FINALIZER in (latest["metadata"].get("finalizers") or []):
                await self._release(latest)
            return
        self._schedule(key, decision, uid)
        # Results already stored for tasks sent just now (a run resumed after a restart
        # finds the steps it had finished): no announcement will come, so look again now.
        answered = bool(decision.dispatch) and await self._answered(decision, routes)
        if answered and self.queue is not None:
            self.queue.add(key)

    async def _answered(
        self, decision: engine.Decision, routes: Mapping[str, bus_mod.Route]
    ) -> bool:
        wanted = {d.task_id: routes[d.agent] for d in decision.dispatch if d.agent in routes}
        return bool(await self.bus.results(wanted))

    # --- observing ------------------------------------------------------------------

    def _agents(self, namespace: str) -> dict[str, list[str]]:
        """The Agents of the namespace, each with the Integrations it binds."""
        return {
            key[1]: list((body.get("spec") or {}).get("integrations") or [])
            for key, body in self.cache.items("Agent")
            if key[0] == namespace
        }

    def _integrations(self, namespace: str) -> dict[str, policy.IntegrationInfo]:
        found: dict[str, policy.IntegrationInfo] = {}
        for key, body in self.cache.items("Integration"):
            if key[0] != namespace:
                continue
            kind = str((body.get("spec") or {}).get("type", ""))
            secret = self.cache.get(
                "Secret", namespace, integration_builders.binding_secret_name(key[1])
            )
            published = secret is not None and (
                kind != "redis" or "uri" in (secret.get("data") or {})
            )
            found[key[1]] = policy.IntegrationInfo(kind, published)
        return found

    def _routes(
        self,
        namespace: str,
        bound: Mapping[str, list[str]],
        integrations: Mapping[str, policy.IntegrationInfo],
    ) -> dict[str, bus_mod.Route]:
        routes: dict[str, bus_mod.Route] = {}
        for agent, names in bound.items():
            integration = policy.task_bus(names, integrations)
            if integration is None:
                continue
            secret = self.cache.get(
                "Secret", namespace, integration_builders.binding_secret_name(integration)
            )
            url = _decoded(secret).get("uri")
            if url:
                routes[agent] = bus_mod.Route(url, *bus_identity(self.cache, namespace, agent))
        return routes

    @staticmethod
    def _wanted(
        task_ids: list[str], agent_of: Mapping[str, str], routes: Mapping[str, bus_mod.Route]
    ) -> dict[str, bus_mod.Route]:
        wanted: dict[str, bus_mod.Route] = {}
        for task_id in task_ids:
            ref = tasks.parse_task_id(task_id)
            agent = agent_of.get(ref.step) if ref is not None else None
            if agent is not None and agent in routes:
                wanted[task_id] = routes[agent]
        return wanted

    # --- acting ---------------------------------------------------------------------

    async def _dispatch(
        self,
        workflow: api.Workflow,
        decision: engine.Decision,
        routes: Mapping[str, bus_mod.Route],
    ) -> None:
        if not decision.dispatch:
            return
        agent_of = {step.id: step.agent for step in workflow.spec.steps}
        contents = (
            await self._inline_contents(workflow, decision, routes, agent_of)
            if workflow.spec.artifacts is None
            else {}
        )
        await asyncio.gather(
            *(
                self.bus.submit(
                    routes[dispatch.agent],
                    dispatch.task_id,
                    wire.agent_task(workflow, dispatch, contents=contents).to_payload(),
                )
                for dispatch in decision.dispatch
            )
        )

    async def _inline_contents(
        self,
        workflow: api.Workflow,
        decision: engine.Decision,
        routes: Mapping[str, bus_mod.Route],
        agent_of: Mapping[str, str],
    ) -> dict[tuple[str, str | None], str]:
        """The artifacts of a Workflow without object storage, read from the results of
        the attempts that wrote them (kept on the bus for a day)."""
        uid = workflow.metadata.uid or ""
        states = {s.id: s for s in decision.status.steps or []}
        wanted: dict[str, bus_mod.Route] = {}
        where: dict[str, tuple[str, str | None]] = {}
        for dispatch in decision.dispatch:
            for ref in dispatch.requires:
                if ref.uri is not None or ref.step not in states:
                    continue
                state = states[ref.step]
                unit: api.StepStatus | api.ItemStatus | None = state
                if ref.item is not None:
                    unit = next((it for it in state.items or [] if it.name == ref.item), None)
                agent = agent_of.get(ref.step)
                if unit is None or not unit.attempts or agent is None or agent not in routes:
                    continue
                task_id = tasks.task_id(uid, ref.step, ref.item, unit.attempts)
                wanted[task_id] = routes[agent]
                where[task_id] = (ref.step, ref.item)
        found = await self.bus.results(wanted)
        contents: dict[tuple[str, str | None], str] = {}
        for task_id, result in found.items():
            text = wire.inline_content(result)
            if text is not None:
                contents[where[task_id]] = text
        return contents

    async def _cancel(
        self,
        decision: engine.Decision,
        routes: Mapping[str, bus_mod.Route],
        agent_of: Mapping[str, str],
        *,
        deleting: bool,
    ) -> None:
        if not decision.cancel:
            return
        if deleting:
            reason = "the Workflow was deleted"
        elif decision.status.phase == "Failed":
            reason = "the run failed"
        else:
            reason = "the attempt ran past timeoutSeconds"
        jobs = []
        for task_id, route in self._wanted(list(decision.cancel), agent_of, routes).items():
            jobs.append(self.bus.cancel(route, task_id, reason=reason))
        await asyncio.gather(*jobs)

    async def _notify(
        self, workflow: api.Workflow, decision: engine.Decision, namespace: str
    ) -> list[events.Event]:
        notify = workflow.spec.notify
        if notify is None or not decision.notifications:
            return []
        secret = self.cache.get(
            "Secret", namespace, integration_builders.binding_secret_name(notify.integration)
        )
        data = _decoded(secret)
        failed: list[events.Event] = []
        for note in decision.notifications:
            # Sent before the status that records the transition: a crash in between
            # sends it again, with the same Message-ID.
            digest = hashlib.sha256(f"{workflow.metadata.uid}:{note.subject}".encode())
            mail = email_mod.Mail(
                sender=data.get("from", ""),
                recipients=tuple(notify.recipients),
                subject=note.subject,
                body=note.body,
                message_id=f"<{digest.hexdigest()[:32]}@bmad-operator>",
            )
            try:
                if not data:
                    raise email_mod.SendError(
                        f"Integration {notify.integration!r} has not published its binding yet"
                    )
                await email_mod.send(data, mail, policy=self.egress_policy)
            except email_mod.SendError as exc:
                failed.append(
                    events.Event(
                        events.WARNING,
                        EVENT_NOTIFICATION_FAILED,
                        f"The {note.phase} notification was not sent: {exc}",
                    )
                )
        return failed

    async def _hold(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """Add our finalizer (before the first task goes out)."""
        finalizers = [*(body["metadata"].get("finalizers") or []), FINALIZER]
        updated = await self._set_finalizers(body, finalizers)
        self.cache.put(updated)
        return updated

    async def _release(self, body: Mapping[str, Any]) -> None:
        metadata = body["metadata"]
        finalizers = [f for f in metadata.get("finalizers") or [] if f != FINALIZER]
        try:
            updated = await self._set_finalizers(body, finalizers)
        except errors.ApiError as exc:
            if exc.not_found:
                return
            raise
        if updated.get("metadata", {}).get("deletionTimestamp") and not finalizers:
            self.cache.remove(KIND, metadata["namespace"], metadata["name"])
        else:
            self.cache.put(updated)

    async def _set_finalizers(
        self, body: Mapping[str, Any], finalizers: list[str]
    ) -> dict[str, Any]:
        """Write the finalizers, only over the version of the Workflow that was read."""
        metadata = body["metadata"]
        patch = {
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": metadata.get("resourceVersion"),
            }
        }
        return await self.api.merge_patch(KIND, metadata["namespace"], metadata["name"], patch)

    def _schedule(self, key: Key, decision: engine.Decision, uid: str) -> None:
        if self.queue is None:
            return
        delays = []
        if decision.requeue_after is not None:
            delays.append(decision.requeue_after)
        if tasks.outstanding(uid, decision.status):
            delays.append(self.poll_seconds)
        if delays:
            # The engine's times are whole seconds; a little later is never too early.
            self.queue.add_after(key, min(delays) + 0.05)
