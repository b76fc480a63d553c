"""`reconcilers.workflow.WorkflowReconciler` against the in-memory API server and bus.

`MemoryBus` stands in for the agents' Redis (`workflows.bus.WorkflowBus`): it records
what was submitted and cancelled and holds the results a test writes. The real buses,
the runtime processes, MinIO and SMTP are in tests/e2e/test_workflows.py. What is
tested here is the reconciler: what it reads, dispatches and cancels, the status it
writes once per pass, the finalizer, the events and when it asks to run again.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Hashable, Mapping
from typing import Any

import pytest

from bmad_crds import runtime_contract as contract
from bmad_integrations import egress, taskwire
from bmad_operator import store
from bmad_operator.builders import meta
from bmad_operator.reconcilers import workflow as workflow_reconciler
from bmad_operator.workflows import bus as bus_mod

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NS = "team-a"
UID = "9d3c1f0a-7b2e-4c55-8a11-0e2f3a4b5c6d"
REDIS_URL = "redis://:s3cret@10.0.0.5:6379/0"
START = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


class MemoryBus:
    """The agents' buses in memory: submissions, cancellations, results by task id."""

    def __init__(self) -> None:
        self.submitted: list[tuple[bus_mod.Route, str, dict[str, Any]]] = []
        self.cancelled: list[tuple[bus_mod.Route, str, str]] = []
        self.stored: dict[str, taskwire.TaskResult] = {}
        self.closed = False

    async def submit(self, route: bus_mod.Route, task_id: str, payload: Mapping[str, Any]) -> None:
        self.submitted.append((route, task_id, dict(payload)))

    async def cancel(self, route: bus_mod.Route, task_id: str, *, reason: str) -> None:
        self.cancelled.append((route, task_id, reason))
        self.stored.setdefault(
            task_id, taskwire.cancelled_result(task_id, reason=reason, finished_at=0.0)
        )

    async def results(self, wanted: Mapping[str, bus_mod.Route]) -> dict[str, taskwire.TaskResult]:
        return {tid: self.stored[tid] for tid in wanted if tid in self.stored}

    async def close(self) -> None:
        self.closed = True

    # --- what the tests do -----------------------------------------------------------

    def ids(self) -> list[str]:
        return [task_id for _, task_id, _ in self.submitted]

    def task(self, task_id: str) -> taskwire.AgentTask:
        [payload] = [p for _, tid, p in self.submitted if tid == task_id]
        return taskwire.decode_agent_task(payload)

    def answer(
        self,
        task_id: str,
        *,
        error: str | None = None,
        items: list[str] | None = None,
        content: str | None = None,
        outputs: Mapping[str, Any] | None = None,
    ) -> None:
        step = self.task(task_id)
        artifact = None
        if step.target is not None and step.target.key is not None:
            artifact = taskwire.StoredArtifact(
                uri=f"s3://bmad/{step.target.key}", version=f"v-{task_id}", size=12
            )
        output = taskwire.StepOutput(
            artifact=artifact,
            content=content,
            items=items,
            outputs=dict(outputs or {}),
            message="stored",
            tokens_in=10,
            tokens_out=5,
        )
        self.stored[task_id] = taskwire.result_of(
            taskwire.Task(task_id=task_id, payload={}, message_id="1-0", attempt=1),
            consumer="runtime-0",
            finished_at=0.0,
            output=None if error else output.to_payload(),
            error=error,
        )


class Requeues:
    """Stands in for the work queue: what was queued at once, and what for later."""

    def __init__(self) -> None:
        self.added: list[Hashable] = []
        self.scheduled: list[tuple[Hashable, float]] = []

    def add(self, key: Hashable) -> None:
        self.added.append(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        self.scheduled.append((key, delay))


def integration(name: str, kind: str) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
        "spec": {"type": kind},
    }


def binding(name: str, data: Mapping[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"{name}-binding",
            "namespace": NS,
            "labels": {**meta.managed_labels(), meta.INTEGRATION_LABEL: name},
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def agent(name: str, integrations: list[str]) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
        "spec": {
            "role": "custom",
            "model": {"provider": "echo", "name": "echo-1"},
            "integrations": integrations,
        },
    }


CHAIN: Obj = {
    "artifacts": {"integration": "artifacts"},
    "inputs": {"project": "todo"},
    "steps": [
        {"id": "brief", "agent": "analyst", "creates": "project-brief.md"},
        {"id": "prd", "agent": "pm", "creates": "prd.md", "requires": ["project-brief.md"]},
    ],
}


class Harness:
    def __init__(self, spec: Mapping[str, Any] = CHAIN) -> None:
        self.kube = FakeKube()
        self.cache = store.Store()
        self.bus = MemoryBus()
        self.queue = Requeues()
        self.now = START
        for obj in (
            integration("bus", "redis"),
            binding("bus", {"type": "redis", "uri": REDIS_URL}),
            integration("artifacts", "objectStorage"),
            binding("artifacts", {"type": "objectStorage", "bucket": "bmad"}),
            agent("analyst", ["bus", "artifacts"]),
            agent("pm", ["bus", "artifacts"]),
        ):
            self.kube.seed(obj, self.cache)
        self.kube.seed(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": "todo", "namespace": NS, "uid": UID, "generation": 1},
                "spec": dict(spec),
            },
            self.cache,
        )
        self.reconciler = self.new_reconciler()

    def new_reconciler(self) -> workflow_reconciler.WorkflowReconciler:
        """A reconciler as a (re)started operator makes it: nothing but the cluster."""
        made = workflow_reconciler.WorkflowReconciler(
            api=self.kube,  # type: ignore[arg-type]
            cache=self.cache,
            bus=self.bus,  # type: ignore[arg-type]
            egress_policy=egress.Policy.parse(allow=[], deny=[], ports=[]),
            poll_seconds=7.0,
            clock=lambda: self.now,
        )
        made.queue = self.queue  # type: ignore[assignment]
        return made

    async def tick(self, seconds: float = 1.0) -> None:
        """One pass, then its status write and Events (made in the background)."""
        await self.decide(seconds)
        await self.reconciler.writes.flush((NS, "todo"))

    async def decide(self, seconds: float = 1.0) -> None:
        """One pass only: what it wrote may still be on its way."""
        self.now += dt.timedelta(seconds=seconds)
        await self.reconciler.reconcile((NS, "todo"))

    def crash(self) -> None:
        """The operator dies: writes not made yet are lost; a new one knows nothing."""
        self.reconciler.writes.cancel()
        self.reconciler = self.new_reconciler()

    def workflow(self) -> Obj | None:
        return self.kube.find("Workflow", NS, "todo")

    def status(self) -> Obj:
        found = self.workflow()
        assert found is not None
        return dict(found.get("status") or {})

    def step(self, step_id: str) -> Obj:
        [found] = [s for s in self.status()["steps"] if s["id"] == step_id]
        return dict(found)

    def condition(self, type_: str) -> Obj:
        [found] = [c for c in self.status()["conditions"] if c["type"] == type_]
        return dict(found)

    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.kube.events]


def task_id(step: str, attempt: int = 1, item: str | None = None) -> str:
    return f"wf:{UID}:{step}:{item}:{attempt}" if item else f"wf:{UID}:{step}:{attempt}"


# --- a run -------------------------------------------------------------------------


async def test_a_chain_runs_step_by_step_on_the_agents_buses() -> None:
    h = Harness()

    await h.tick()

    assert h.bus.ids() == [task_id("brief")]
    route, _, _ = h.bus.submitted[0]
    assert route == bus_mod.Route(REDIS_URL, NS, "analyst")  # tenant = the namespace
    brief = h.bus.task(task_id("brief"))
    assert brief.workflow == taskwire.WorkflowRef(namespace=NS, name="todo", uid=UID)
    assert brief.target == taskwire.ArtifactTarget(
        name="project-brief.md",
        mode="creates",
        integration="artifacts",
        key="team-a/todo/project-brief.md",
    )
    assert brief.inputs == {"project": "todo"}
    assert h.status()["phase"] == "Running"
    assert h.step("brief")["phase"] == "Running"
    workflow = h.workflow()
    assert workflow is not None
    assert workflow_reconciler.FINALIZER in workflow["metadata"]["finalizers"]
    assert h.reasons() == ["StepStarted", "Started"]
    # While an attempt is out: look again after the poll interval.
    assert h.queue.scheduled[-1] == ((NS, "todo"), pytest.approx(7.05))

    h.bus.answer(task_id("brief"))
    await h.tick()

    assert h.bus.ids() == [task_id("brief"), task_id("prd")]
    [ref] = h.bus.task(task_id("prd")).requires
    assert ref == taskwire.ArtifactRef(
        name="project-brief.md",
        step="brief",
        integration="artifacts",
        uri="s3://bmad/team-a/todo/project-brief.md",
        version=f"v-{task_id('brief')}",
    )
    assert h.step("brief")["artifact"] == "s3://bmad/team-a/todo/project-brief.md"
    assert h.step("brief")["artifactVersion"] == f"v-{task_id('brief')}"
    assert h.status()["progress"] == "1/2"

    h.bus.answer(task_id("prd"))
    await h.tick()

    status = h.status()
    assert status["phase"] == "Succeeded"
    assert status["progress"] == "2/2"
    assert status["totals"] == {"steps": 2, "stepsCompleted": 2, "tokensIn": 20, "tokensOut": 10}
    assert h.condition("Succeeded")["status"] == "True"
    workflow = h.workflow()
    assert workflow is not None
    assert workflow_reconciler.FINALIZER not in (workflow["metadata"].get("finalizers") or [])
    assert "Succeeded" in h.reasons()
    # Status and artifacts hold references only: no content, no credentials.
    assert "s3cret" not in str(status)


async def test_in_a_tenants_namespace_tasks_go_to_the_stream_its_runtime_reads() -> None:
    h = Harness()
    h.kube.seed(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NS, "labels": {meta.TENANT_LABEL: "acme"}},
        },
        h.cache,
    )

    await h.tick()

    route, _, _ = h.bus.submitted[0]
    # The runtime's BMAD_TENANT is the Tenant; its agent key qualifies the name.
    assert route == bus_mod.Route(REDIS_URL, "acme", f"{NS}.analyst")
    assert route.agent == contract.agent_key(name="analyst", namespace=NS, tenant="acme")


async def test_a_pass_without_news_writes_nothing_and_dispatches_nothing() -> None:
    h = Harness()
    await h.tick()
    h.kube.reset()

    await h.tick()

    assert h.bus.ids() == [task_id("brief")]
    assert h.kube.verbs("patch_status") == []
    assert h.kube.events == []


async def test_an_operator_restart_mid_run_resumes_from_the_status() -> None:
    h = Harness()
    await h.tick()
    h.bus.answer(task_id("brief"))

    h.reconciler = h.new_reconciler()  # the operator restarted: no memory but the cluster
    await h.tick()
    h.bus.answer(task_id("prd"))
    await h.tick()

    assert h.status()["phase"] == "Succeeded"
    assert h.bus.ids() == [task_id("brief"), task_id("prd")]


async def test_a_crash_between_dispatch_and_status_dispatches_the_same_id_again() -> None:
    h = Harness()
    await h.decide()
    h.crash()
    assert h.kube.verbs("patch_status") == [], "the operator died before writing"

    await h.tick()

    # The same id twice: the bus enqueues an id once (its own tests show that).
    assert h.bus.ids() == [task_id("brief"), task_id("brief")]
    assert h.step("brief")["attempts"] == 1


async def test_the_next_pass_starts_from_the_decided_status_before_it_is_stored() -> None:
    h = Harness()
    await h.decide()
    h.bus.answer(task_id("brief"))

    await h.decide()  # the first pass's write has not been made yet

    assert h.bus.ids() == [task_id("brief"), task_id("prd")]
    h.bus.answer(task_id("prd"))
    await h.tick()
    assert h.status()["phase"] == "Succeeded"
    assert h.bus.ids() == [task_id("brief"), task_id("prd")]
    # The passes' decisions were written coalesced: fewer writes than passes.
    assert len(h.kube.verbs("patch_status")) < 3
    assert h.reasons().count("StepSucceeded") == 2


async def test_a_crash_with_several_passes_unwritten_resumes_without_a_new_attempt() -> None:
    h = Harness()
    await h.decide()
    h.bus.answer(task_id("brief"))
    await h.decide()
    h.bus.answer(task_id("prd"))
    h.crash()  # both steps finished on the bus; the stored status holds neither
    assert h.status().get("progress") in (None, "0/2")

    await h.tick()
    # The task sent again already has its result: the Workflow is queued at once
    # instead of waiting for an announcement that came before the crash.
    assert h.queue.added == [(NS, "todo")]
    await h.tick()
    await h.tick()

    assert h.status()["phase"] == "Succeeded"
    # Only the ids of the first attempts, each sent again at most once (the bus
    # enqueues an id once): no step ran a second attempt.
    assert set(h.bus.ids()) == {task_id("brief"), task_id("prd")}
    assert h.step("brief")["attempts"] == 1
    assert h.step("prd")["attempts"] == 1


async def test_a_stored_result_wakes_its_workflow_at_once() -> None:
    h = Harness()
    await h.tick()

    h.reconciler.on_finished(NS, "analyst", task_id("brief"))
    h.reconciler.on_finished(NS, "analyst", "wf:someone-else:x:1")
    h.reconciler.on_finished(NS, "analyst", "not-a-workflow-task")

    assert h.queue.added == [(NS, "todo")]


# --- retries, timeouts, failures -----------------------------------------------------


async def test_a_timed_out_attempt_is_cancelled_and_retried_after_the_backoff() -> None:
    spec = {
        **CHAIN,
        "steps": [
            {
                "id": "brief",
                "agent": "analyst",
                "creates": "project-brief.md",
                "timeoutSeconds": 30,
                "retries": {"limit": 1, "backoffSeconds": 5},
            }
        ],
    }
    h = Harness(spec)
    await h.tick()
    # Looked at again after the poll interval, which comes before the deadline.
    assert h.queue.scheduled[-1][1] == pytest.approx(7.05)

    await h.tick(seconds=30)

    [(route, cancelled, reason)] = h.bus.cancelled
    assert (route.agent, cancelled) == ("analyst", task_id("brief"))
    assert reason == "the attempt ran past timeoutSeconds"
    assert h.step("brief")["phase"] == "Retrying"
    assert h.queue.scheduled[-1][1] == pytest.approx(5.05)

    await h.tick(seconds=5)

    assert h.bus.ids() == [task_id("brief"), task_id("brief", 2)]
    assert h.step("brief")["attempts"] == 2


async def test_a_failed_step_fails_the_run_naming_the_step_and_its_message() -> None:
    h = Harness()
    await h.tick()
    h.bus.answer(task_id("brief"), error="no model could answer (echo: HTTP 400)")

    await h.tick()

    status = h.status()
    assert status["phase"] == "Failed"
    failed = h.condition("Failed")
    assert failed["status"] == "True"
    assert failed["message"] == (
        "Step brief failed: failed: no model could answer (echo: HTTP 400)"
    )
    assert h.bus.ids() == [task_id("brief")]
    workflow = h.workflow()
    assert workflow is not None
    assert not workflow["metadata"].get("finalizers")


# --- deletion --------------------------------------------------------------------------


async def test_deleting_a_running_workflow_cancels_its_tasks_then_lets_it_go() -> None:
    h = Harness()
    await h.tick()
    workflow = h.workflow()
    assert workflow is not None
    workflow["metadata"]["deletionTimestamp"] = "2025-03-01T12:00:05Z"
    h.cache.put(dict(workflow))

    await h.tick()

    [(_, cancelled, reason)] = h.bus.cancelled
    assert (cancelled, reason) == (task_id("brief"), "the Workflow was deleted")
    assert h.workflow() is None, "the finalizer was released and the object went"
    assert "Cancelled" in h.reasons()


# --- what stops a run before it starts -------------------------------------------------


async def test_a_step_naming_a_missing_agent_dispatches_nothing() -> None:
    h = Harness({**CHAIN, "steps": [{"id": "brief", "agent": "mary", "creates": "b.md"}]})

    await h.tick()

    assert h.bus.submitted == []
    valid = h.condition("Valid")
    assert (valid["status"], valid["reason"]) == ("False", "AgentNotFound")
    assert valid["message"].startswith("spec.steps[0].agent: step 'brief' names Agent 'mary'")
    assert "InvalidWorkflow" in h.reasons()
    workflow = h.workflow()
    assert workflow is not None
    assert not workflow["metadata"].get("finalizers")


@pytest.mark.parametrize(
    ("agents", "reason", "words"),
    [
        (["artifacts"], "NoTaskBus", "binds no Integration of type redis"),
        (["bus"], "ArtifactsNotBound", "does not bind Integration 'artifacts'"),
    ],
)
async def test_an_agent_that_cannot_take_the_steps_tasks_is_named(
    agents: list[str], reason: str, words: str
) -> None:
    h = Harness()
    h.kube.seed(agent("analyst", agents), h.cache)

    await h.tick()

    assert h.bus.submitted == []
    valid = h.condition("Valid")
    assert valid["reason"] == reason
    assert valid["message"].startswith("spec.steps[0].agent: step 'brief' runs on Agent")
    assert words in valid["message"]


async def test_a_bus_whose_binding_is_not_published_waits_for_it() -> None:
    h = Harness()
    h.cache.remove("Secret", NS, "bus-binding")

    await h.tick()

    assert h.bus.submitted == []
    assert h.condition("Valid")["reason"] == "BindingNotPublished"

    h.kube.seed(binding("bus", {"type": "redis", "uri": REDIS_URL}), h.cache)
    await h.tick()

    assert h.bus.ids() == [task_id("brief")]
    assert h.condition("Valid")["status"] == "True"


async def test_integrations_of_the_wrong_type_or_missing_are_named_by_field() -> None:
    spec = {
        **CHAIN,
        "artifacts": {"integration": "bus"},
        "notify": {"integration": "mail", "recipients": ["po@example.com"]},
    }
    h = Harness(spec)

    await h.tick()

    message = h.condition("Valid")["message"]
    assert "spec.artifacts.integration: Integration 'bus' is of type redis" in message
    assert "spec.notify.integration: Integration 'mail' does not exist" in message
    assert h.bus.submitted == []


@pytest.mark.parametrize(
    ("steps", "reason", "message"),
    [
        (
            [{"id": "prd", "agent": "pm", "creates": "prd.md", "requires": ["brief.md"]}],
            "RequirementNotCreated",
            "spec.steps[0].requires: step 'prd' requires 'brief.md', which no step creates",
        ),
        (
            [
                {"id": "brief", "agent": "analyst", "creates": "brief.md"},
                {"id": "dev", "agent": "pm", "creates": "code", "repeat": {"over": "stories"}},
            ],
            "RepeatOverNothing",
            "spec.steps[1].repeat.over: step 'dev' repeats over 'stories', which no step creates",
        ),
        (
            [
                {"id": "brief", "agent": "analyst", "creates": "brief.md"},
                {"id": "again", "agent": "pm", "creates": "brief.md"},
            ],
            "DuplicateCreator",
            "spec.steps[1].creates: step 'again' creates 'brief.md', which step 'brief' creates",
        ),
    ],
)
async def test_a_graph_the_steps_do_not_form_is_named_by_step_and_field(
    steps: list[Obj], reason: str, message: str
) -> None:
    """The API server no longer checks how steps relate (docs/workflows.md): the
    operator does, and names the step as well as the field."""
    h = Harness({**CHAIN, "steps": steps})

    await h.tick()

    valid = h.condition("Valid")
    assert (valid["status"], valid["reason"]) == ("False", reason)
    assert valid["message"].startswith(message)
    assert h.condition("Ready")["reason"] == reason
    assert "InvalidWorkflow" in h.reasons()
    assert h.bus.submitted == []
    assert {s["phase"] for s in h.status()["steps"]} == {"Pending"}


async def test_a_stored_spec_the_model_refuses_is_an_invalid_spec_condition() -> None:
    h = Harness({"steps": [{"id": "Not_A_Label", "agent": "analyst"}]})

    await h.tick()

    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.steps.0.id" in ready["message"]
    assert h.bus.submitted == []


# --- a Workflow without object storage -------------------------------------------------


async def test_without_object_storage_artifacts_travel_inside_the_tasks() -> None:
    spec = {key: value for key, value in CHAIN.items() if key != "artifacts"}
    h = Harness(spec)
    await h.tick()
    assert h.bus.task(task_id("brief")).target == taskwire.ArtifactTarget(
        name="project-brief.md", mode="creates"
    )
    h.bus.answer(task_id("brief"), content="# The brief")

    await h.tick()

    [ref] = h.bus.task(task_id("prd")).requires
    assert (ref.name, ref.uri, ref.content) == ("project-brief.md", None, "# The brief")
