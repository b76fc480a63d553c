"""Workflows run for real: the operator process, a real control plane, Redis, MinIO and
SMTP, and one `bmad runtime` process per Agent consuming its Agent's stream.

The runtimes are configured by what the operator rendered for each Agent (agent.json,
the container's environment, the binding Secrets as files: `bmad_testbed.agents`), as
their pods would be. The seven BMAD roles answer with the echo provider; two more
Agents, ``flaky`` and ``steady``, use an OpenAI-compatible endpoint served by this
module (`FakeLlm`, a local HTTP server in OpenAI's documented shape) whose answers the
step's description scripts: fail twice, refuse, take too long, take a while.

Everything runs in one namespace with one set of processes (module scope); each test
uses its own Workflows. The test that SIGKILLs the operator restarts it and runs last.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import mailbox
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from botocore.config import Config

from bmad_testbed import agents as agent_procs
from bmad_testbed import operator_proc
from bmad_testbed.kubectl import Kubectl, KubectlError, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROLES = ("analyst", "pm", "architect", "po", "sm", "dev", "qa")
SCRIPTED = ("flaky", "steady")
# The scripted agents' runtimes, tuned on the process: spec.runtime.env may not set the
# runtime's own BMAD_ variables (the operator alone does).
SCRIPTED_ENV = {
    "BMAD_MODEL_ATTEMPTS": "1",
    "BMAD_MODEL_TIMEOUT_SECONDS": "10",
    # A replica that holds a task this long without finishing is presumed dead: well
    # above a step's time here (1.5 s), even on a loaded machine.
    "BMAD_TASK_MIN_IDLE_MS": "8000",
}


# --- an OpenAI-compatible endpoint whose answers the step's description scripts -------


class FakeLlm:
    """POST /v1/chat/completions and GET /v1/models, in OpenAI's documented shape.

    The last user message (the step's prompt) holds ``BEHAVIOUR: <what>``: ``refuse``
    (HTTP 400), ``fail-twice`` (400 on attempts 1 and 2 of the step), ``slow`` (answers
    after 30 s), ``delay`` (after 1.5 s), ``hold`` (once `release` is set, or after 6 s,
    below the runtimes' model timeout); anything else is answered at once.
    """

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "fake-1", "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
                prompt = str(users[-1]["content"]) if users else ""
                owner.prompts.append(prompt)
                status, answer = owner.answer(prompt)
                if status != 200:
                    self._send(status, {"error": {"message": answer, "type": "invalid_request"}})
                    return
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body.get("model", "fake-1"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
                    },
                )

            def _send(self, status: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                with contextlib.suppress(OSError):  # the runtime gave up (a timeout)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, prompt: str) -> tuple[int, str]:
        if "BEHAVIOUR: hold" in prompt:
            self.release.wait(6)
        if "BEHAVIOUR: refuse" in prompt:
            return 400, "the model refuses this step"
        if "BEHAVIOUR: fail-twice" in prompt and (
            "(attempt 1 of" in prompt or "(attempt 2 of" in prompt
        ):
            return 400, "scripted failure"
        if "BEHAVIOUR: slow" in prompt:
            time.sleep(30)
        if "BEHAVIOUR: delay" in prompt:
            time.sleep(1.5)
        return 200, "# Done\n\nThe step is done."

    def count(self, marker: str) -> int:
        return sum(1 for p in self.prompts if marker in p)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the namespace, its Integrations, Agents and runtimes ------------------------------


@dataclass
class Bed:
    kubectl: Kubectl
    namespace: str
    bucket: str
    maildir: Path
    redis_url: str
    s3: dict[str, str]
    llm: FakeLlm
    workdir: Path
    runtimes: dict[str, list[agent_procs.AgentProcess]] = field(default_factory=dict)

    def k(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kubectl.run(*args, "-n", self.namespace, check=check)

    def apply_workflow(self, name: str, spec: dict[str, Any]) -> None:
        self.kubectl.apply(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Workflow",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": spec,
            }
        )

    def workflow(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.kubectl.json("get", "workflow", name, "-n", self.namespace)
        return found

    def wait(self, name: str, *phases: str, timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = self.workflow(name)
            return found if (found.get("status") or {}).get("phase") in phases else None

        result: dict[str, Any] = eventually(
            reached, timeout=timeout, interval=0.3, what=f"Workflow {name} in {phases}"
        )
        return result

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def added(self, agent: str) -> int:
        """How many tasks were ever put on ``agent``'s stream (XINFO's entries-added)."""
        with self.redis() as client:
            info = client.xinfo_stream(f"bmad:{self.namespace}:{agent}:tasks")
        return int(info["entries-added"])

    def results(self, agent: str, uid: str) -> dict[str, dict[str, Any]]:
        """The results on ``agent``'s bus of the tasks of the Workflow ``uid``."""
        prefix = f"bmad:{self.namespace}:{agent}:results:"
        with self.redis() as client:
            keys = list(client.scan_iter(match=f"{prefix}wf:{uid}:*", count=500))
            return {key[len(prefix) :]: json.loads(client.get(key) or "{}") for key in keys}

    def s3_client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.s3["endpoint"],
            aws_access_key_id=self.s3["access_key"],
            aws_secret_access_key=self.s3["secret_key"],
            region_name=self.s3["region"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def mails(self) -> list[Any]:
        box = mailbox.Maildir(str(self.maildir), create=False)
        return [message for _, message in box.items()]


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _integration(name: str, kind: str, block: dict[str, Any], secret: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, kind: block}
    if secret:
        spec["secretRef"] = {"name": secret}
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": name},
        "spec": spec,
    }


def _agent(name: str, role: str, model: dict[str, Any], bound: list[str], **spec: Any) -> Any:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "role": role,
            "model": model,
            "memory": {"store": "inProcess"},
            "auth": {"mode": "none"},  # no auth0 Integration on the test bed
            "integrations": bound,
            **spec,
        },
    }


@pytest.fixture(scope="module")
def bed(
    kubectl: Kubectl,
    operator: operator_proc.OperatorProcess,
    testbed_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Bed]:
    namespace = f"wf-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", namespace)
    ns = kubectl.in_namespace(namespace)
    llm = FakeLlm()
    made = Bed(
        kubectl=kubectl,
        namespace=namespace,
        bucket=f"bmad-wf-{secrets.token_hex(4)}",
        maildir=Path(testbed_env["BMAD_SMTP_MAILDIR"]),
        redis_url=testbed_env["BMAD_REDIS_URL"],
        s3={
            "endpoint": testbed_env["BMAD_S3_ENDPOINT"],
            "access_key": testbed_env["BMAD_S3_ACCESS_KEY"],
            "secret_key": testbed_env["BMAD_S3_SECRET_KEY"],
            "region": testbed_env["BMAD_S3_REGION"],
        },
        llm=llm,
        workdir=tmp_path_factory.mktemp("agents"),
    )
    try:
        ns.apply(_secret("bus-creds", {"password": testbed_env["BMAD_REDIS_PASSWORD"]}))
        ns.apply(
            _secret(
                "s3-creds",
                {
                    "accessKeyId": made.s3["access_key"],
                    "secretAccessKey": made.s3["secret_key"],
                },
            )
        )
        for integration in (
            _integration(
                "bus",
                "redis",
                {"host": "127.0.0.1", "port": int(testbed_env["BMAD_REDIS_PORT"])},
                "bus-creds",
            ),
            _integration(
                "artifacts",
                "objectStorage",
                {
                    "provider": "minio",
                    "endpoint": made.s3["endpoint"],
                    "region": made.s3["region"],
                    "bucket": made.bucket,
                    "createBucket": True,
                    "versioning": True,
                },
                "s3-creds",
            ),
            _integration(
                "mail",
                "email",
                {
                    "provider": "smtp",
                    "host": testbed_env["BMAD_SMTP_HOST"],
                    "port": int(testbed_env["BMAD_SMTP_PORT"]),
                    "from": "bmad@example.com",
                },
                None,
            ),
            _integration(
                "llm",
                "llm",
                {"provider": "openai-compatible", "baseUrl": llm.url, "defaultModel": "fake-1"},
                None,
            ),
        ):
            ns.apply(integration)
        echo = {"provider": "echo", "name": "echo-1"}
        fake = {"provider": "openai-compatible", "name": "fake-1", "integration": "llm"}
        for role in ROLES:
            ns.apply(_agent(role, role, echo, ["bus", "artifacts"]))
        for name in SCRIPTED:
            ns.apply(_agent(name, "dev", fake, ["bus", "artifacts", "llm"]))
        kubectl.run(
            "wait",
            "--for=condition=Ready",
            "integration/bus",
            "integration/artifacts",
            "integration/mail",
            "integration/llm",
            "-n",
            namespace,
            "--timeout=120s",
        )
        for one in agent_procs.start(kubectl, namespace, list(ROLES), made.workdir, timeout=180):
            made.runtimes.setdefault(one.agent, []).append(one)
        for name in SCRIPTED:
            one = agent_procs.spawn(
                kubectl, namespace, name, made.workdir, extra_env=SCRIPTED_ENV, timeout=180
            )
            made.runtimes.setdefault(name, []).append(agent_procs.wait_ready(one, timeout=180))
        yield made
    finally:
        for running in made.runtimes.values():
            for one in running:
                one.stop()
        llm.close()
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)


# --- a greenfield run ------------------------------------------------------------------

GREENFIELD: dict[str, Any] = {
    "inputs": {"project": "todo-service"},
    "artifacts": {"integration": "artifacts"},
    "steps": [
        {
            "id": "brief",
            "agent": "analyst",
            "creates": "project-brief.md",
            "description": "Write the project brief.",
        },
        {"id": "prd", "agent": "pm", "creates": "prd.md", "requires": ["project-brief.md"]},
        {
            "id": "architecture",
            "agent": "architect",
            "creates": "architecture.md",
            "requires": ["prd.md"],
            # The echo provider repeats the prompt: this block becomes the step's outputs.
            "description": "Design it.\n```bmad\noutputs: {suggests_prd_changes: false}\n```",
        },
        {
            "id": "update-prd",
            "agent": "pm",
            "updates": "prd.md",
            "requires": ["architecture.md"],
            "condition": "outputs['architecture'].suggests_prd_changes == true",
        },
        {
            "id": "shard",
            "agent": "po",
            "creates": "stories",
            "requires": ["prd.md", "architecture.md"],
            "description": "Validate and shard.\n```bmad\nitems: ['1.1', '1.2']\n```",
        },
        {
            "id": "draft",
            "agent": "sm",
            "creates": "story.md",
            "requires": ["stories"],
            "repeat": {"over": "stories", "maxParallel": 2},
        },
        {
            "id": "implement",
            "agent": "dev",
            "creates": "code",
            "requires": ["story.md"],
            "repeat": {"over": "stories"},
        },
        {
            "id": "review",
            "agent": "qa",
            "updates": "code",
            "requires": ["code"],
            "repeat": {"over": "stories"},
        },
    ],
}


def _artifacts(status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, uri, version) of every artifact version the status names."""
    found = []
    for step in status["steps"]:
        if step.get("artifact"):
            found.append((step["id"], step["artifact"], step.get("artifactVersion", "")))
        for item in step.get("items") or []:
            if item.get("artifact"):
                where = f"{step['id']}[{item['name']}]"
                found.append((where, item["artifact"], item.get("artifactVersion", "")))
    return found


def test_a_greenfield_workflow_runs_to_succeeded_with_every_artifact_versioned(
    bed: Bed, kubectl: Kubectl
) -> None:
    bed.apply_workflow("greenfield", GREENFIELD)
    waiting = subprocess.Popen(
        [
            kubectl.binary,
            f"--kubeconfig={kubectl.kubeconfig}",
            "wait",
            "--for=condition=Succeeded",
            "workflow/greenfield",
            "-n",
            bed.namespace,
            "--timeout=300s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = waiting.communicate(timeout=330)
    assert waiting.returncode == 0, out
    assert "condition met" in out

    workflow = bed.workflow("greenfield")
    status = workflow["status"]
    assert status["phase"] == "Succeeded"
    assert status["progress"] == "8/8"
    phases = {s["id"]: (s["phase"], s.get("reason")) for s in status["steps"]}
    assert phases == {
        "brief": ("Succeeded", "Completed"),
        "prd": ("Succeeded", "Completed"),
        "architecture": ("Succeeded", "Completed"),
        "update-prd": ("Skipped", "ConditionFalse"),
        "shard": ("Succeeded", "Completed"),
        "draft": ("Succeeded", "Completed"),
        "implement": ("Succeeded", "Completed"),
        "review": ("Succeeded", "Completed"),
    }
    shard = next(s for s in status["steps"] if s["id"] == "shard")
    assert shard["artifactItems"] == ["1.1", "1.2"]
    for step in status["steps"][5:]:
        assert [(i["name"], i["phase"]) for i in step["items"]] == [
            ("1.1", "Succeeded"),
            ("1.2", "Succeeded"),
        ]
    assert status["totals"]["tokensIn"] > 0
    assert status["totals"]["tokensOut"] > 0

    # Every artifact the status names is a version in MinIO (versioning on).
    s3 = bed.s3_client()
    found = _artifacts(status)
    assert len(found) == 4 + 3 * 2
    for where, uri, version in found:
        assert version, where
        assert version != "null", where
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        assert bucket == bed.bucket
        head = s3.head_object(Bucket=bucket, Key=key, VersionId=version)
        assert head["VersionId"] == version, where
    # The dev created each item's code and the qa wrote a new version of it.
    for item in ("1.1", "1.2"):
        key = f"{bed.namespace}/greenfield/items/{item}/code"
        versions = s3.list_object_versions(Bucket=bed.bucket, Prefix=key)["Versions"]
        assert len([v for v in versions if v["Key"] == key]) == 2

    listed = bed.k("get", "workflows").stdout.splitlines()
    assert listed[0].split() == ["NAME", "PHASE", "PROGRESS", "READY", "AGE"]
    row = next(line.split() for line in listed[1:] if line.startswith("greenfield "))
    assert row[1:4] == ["Succeeded", "8/8", "True"]

    described = bed.k("describe", "workflow", "greenfield").stdout
    shown = described.split("\nStatus:\n", 1)[1]
    for step_id, (phase, reason) in phases.items():
        entry = re.search(
            rf"^\s+Id:\s+{re.escape(step_id)}\n(?:\s+\S.*\n)*?\s+Phase:\s+{phase}\n"
            rf"\s+Reason:\s+{reason}$",
            shown,
            re.MULTILINE,
        )
        assert entry is not None, (step_id, phase)
    for _, uri, version in found:
        assert uri in described
        assert version in described
    assert "Skipped" in described
    assert "ConditionFalse" in described

    reasons = bed.k(
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=Workflow,involvedObject.name=greenfield",
        "-o",
        "jsonpath={.items[*].reason}",
    ).stdout.split()
    for reason in ("Started", "StepStarted", "StepSucceeded", "StepSkipped", "Succeeded"):
        assert reason in reasons
    assert not workflow["metadata"].get("finalizers"), "released once the run ended"


# --- failures, retries, timeouts -------------------------------------------------------


def _one_step(behaviour: str, **step: Any) -> dict[str, Any]:
    return {
        "artifacts": {"integration": "artifacts"},
        "steps": [
            {
                "id": "work",
                "agent": "flaky",
                "creates": "work.md",
                "description": f"Do the work. BEHAVIOUR: {behaviour}",
                **step,
            }
        ],
    }


def test_failures_are_retried_with_backoff_and_end_the_run_as_the_spec_says(bed: Bed) -> None:
    quick = {"backoffSeconds": 1, "backoffFactor": 1}
    bed.apply_workflow("fails-twice", _one_step("fail-twice", retries={"limit": 2, **quick}))
    bed.apply_workflow("always-fails", _one_step("refuse", retries={"limit": 1, **quick}))
    bed.apply_workflow(
        "times-out",
        _one_step("slow", timeoutSeconds=3, retries={"limit": 1, **quick}),
    )
    bed.apply_workflow(
        "optional-fails",
        {
            "artifacts": {"integration": "artifacts"},
            "steps": [
                {
                    "id": "extra",
                    "agent": "flaky",
                    "creates": "extra.md",
                    "optional": True,
                    "description": "Nice to have. BEHAVIOUR: refuse",
                },
                {"id": "main", "agent": "flaky", "creates": "main.md", "dependsOn": ["extra"]},
            ],
        },
    )

    twice = bed.wait("fails-twice", "Succeeded", "Failed")["status"]
    assert twice["phase"] == "Succeeded"
    [work] = twice["steps"]
    assert (work["phase"], work["attempts"]) == ("Succeeded", 3)

    always = bed.wait("always-fails", "Succeeded", "Failed")
    assert always["status"]["phase"] == "Failed"
    [work] = always["status"]["steps"]
    assert (work["phase"], work["reason"], work["attempts"]) == ("Failed", "AgentFailed", 2)
    failed = next(c for c in always["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert failed["message"].startswith("Step work failed: failed after 2 attempts: ")
    assert "the model refuses this step" in failed["message"] or "HTTP 400" in failed["message"]

    optional = bed.wait("optional-fails", "Succeeded", "Failed")["status"]
    assert optional["phase"] == "Succeeded"
    steps = {s["id"]: s for s in optional["steps"]}
    assert steps["extra"]["phase"] == "Failed"
    assert steps["main"]["phase"] == "Succeeded"

    late = bed.wait("times-out", "Succeeded", "Failed", timeout=120)
    [work] = late["status"]["steps"]
    assert (work["phase"], work["reason"], work["attempts"]) == ("Failed", "TimedOut", 2)
    assert "timed out after 2 attempts: no result within timeoutSeconds (3s)" in work["message"]
    # Each timed-out attempt was cancelled on the bus: its id holds a cancelled result.
    results = bed.results("flaky", late["metadata"]["uid"])
    assert {tid.rsplit(":", 1)[1]: r["status"] for tid, r in results.items()} == {
        "1": "cancelled",
        "2": "cancelled",
    }


# --- approvals -------------------------------------------------------------------------


def _gated(approvers: list[str] | None = None) -> dict[str, Any]:
    gate: dict[str, Any] = {"prompt": "Is the PRD complete?"}
    if approvers:
        gate["approvers"] = approvers
    return {
        "artifacts": {"integration": "artifacts"},
        "notify": {
            "integration": "mail",
            "recipients": ["leads@example.com"],
            "phases": ["AwaitingApproval", "Succeeded"],
        },
        "steps": [
            {"id": "brief", "agent": "analyst", "creates": "project-brief.md"},
            {
                "id": "prd",
                "agent": "pm",
                "creates": "prd.md",
                "requires": ["project-brief.md"],
                "approval": gate,
            },
            {"id": "architecture", "agent": "architect", "creates": "a.md", "requires": ["prd.md"]},
        ],
    }


def _mail(bed: Bed, subject: str) -> Any:
    def arrived() -> Any:
        return next((m for m in bed.mails() if m["Subject"] == subject), None)

    return eventually(arrived, timeout=60, what=f"a mail {subject!r}")


def test_a_run_waits_for_approval_notifies_by_mail_and_goes_on_once_approved(
    bed: Bed, kubectl: Kubectl, repo_root: Path
) -> None:
    bed.apply_workflow("gated", _gated())

    waiting = bed.wait("gated", "AwaitingApproval")
    steps = {s["id"]: s for s in waiting["status"]["steps"]}
    assert steps["prd"]["phase"] == "AwaitingApproval"
    assert steps["architecture"]["phase"] == "Pending"
    mail = _mail(bed, f"Workflow {bed.namespace}/gated step prd waits for approval")
    assert mail["To"] == "leads@example.com"
    assert mail["From"] == "bmad@example.com"
    text = mail.get_payload(decode=True).decode()
    assert "Is the PRD complete?" in text
    assert "add prd to spec.approvals" in text

    command = [sys.executable, "-m", "bmad_cli.main", "workflow", "approve", "gated", "prd"]
    approve = subprocess.run(
        [*command, "-n", bed.namespace],
        env={**os.environ, "KUBECONFIG": kubectl.kubeconfig},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert approve.returncode == 0, approve.stderr
    assert "approved step prd of Workflow gated" in approve.stdout + approve.stderr

    done = bed.wait("gated", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded"
    prd = next(s for s in done["status"]["steps"] if s["id"] == "prd")
    assert (prd["phase"], prd["reason"]) == ("Succeeded", "Approved")
    _mail(bed, f"Workflow {bed.namespace}/gated succeeded")


def test_only_a_listed_approver_can_approve(bed: Bed, kubectl: Kubectl) -> None:
    bed.kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "workflow-editors", "namespace": bed.namespace},
            "rules": [
                {
                    "apiGroups": ["bmad.dev"],
                    "resources": ["workflows"],
                    "verbs": ["get", "list", "patch", "update"],
                }
            ],
        }
    )
    bed.kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "workflow-editors", "namespace": bed.namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "workflow-editors",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                for user in ("alice", "bob")
            ],
        }
    )
    bed.apply_workflow("guarded", _gated(approvers=["alice"]))
    bed.wait("guarded", "AwaitingApproval")
    patch = json.dumps({"spec": {"approvals": ["prd"]}})

    with pytest.raises(KubectlError) as refused:
        bed.k("--as=bob", "patch", "workflow", "guarded", "--type=merge", "-p", patch)
    assert "bob may not approve step 'prd'" in refused.value.stderr
    assert "spec.steps[1].approval.approvers allows alice" in refused.value.stderr
    assert not bed.workflow("guarded")["spec"].get("approvals")

    bed.k("--as=alice", "patch", "workflow", "guarded", "--type=merge", "-p", patch)
    assert bed.wait("guarded", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"


# --- invalid workflows -----------------------------------------------------------------


def test_invalid_workflows_are_marked_naming_step_and_field_and_nothing_is_dispatched(
    bed: Bed,
) -> None:
    before = {agent: bed.added(agent) for agent in ("analyst", "pm")}
    # The API server checks each field; how steps relate (a requirement or repeat over
    # an artifact no step creates, a cycle) the operator checks, naming step and field.
    bed.apply_workflow(
        "missing-requirement",
        {"steps": [{"id": "prd", "agent": "pm", "creates": "prd.md", "requires": ["brief.md"]}]},
    )
    bed.apply_workflow(
        "repeat-over-nothing",
        {
            "steps": [
                {"id": "brief", "agent": "analyst", "creates": "brief.md"},
                {"id": "dev", "agent": "pm", "creates": "code", "repeat": {"over": "stories"}},
            ]
        },
    )
    bed.apply_workflow(
        "cycle",
        {
            "steps": [
                {"id": "a", "agent": "analyst", "creates": "a.md", "requires": ["c.md"]},
                {"id": "b", "agent": "pm", "creates": "b.md", "requires": ["a.md"]},
                {"id": "c", "agent": "pm", "creates": "c.md", "requires": ["b.md"]},
            ]
        },
    )
    bed.apply_workflow(
        "unknown-agent",
        {
            "steps": [
                {"id": "brief", "agent": "analyst", "creates": "brief.md"},
                {"id": "ux", "agent": "ux-expert", "creates": "ux.md", "requires": ["brief.md"]},
            ]
        },
    )

    def marked(name: str) -> dict[str, Any] | None:
        conditions = (bed.workflow(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Valid"), None)

    missing = eventually(lambda: marked("missing-requirement"), timeout=60, what="Valid")
    assert (missing["status"], missing["reason"]) == ("False", "RequirementNotCreated")
    assert missing["message"].startswith(
        "spec.steps[0].requires: step 'prd' requires 'brief.md', which no step creates"
    )
    nothing = eventually(lambda: marked("repeat-over-nothing"), timeout=60, what="Valid")
    assert (nothing["status"], nothing["reason"]) == ("False", "RepeatOverNothing")
    assert nothing["message"].startswith(
        "spec.steps[1].repeat.over: step 'dev' repeats over 'stories', which no step creates"
    )
    cycle = eventually(lambda: marked("cycle"), timeout=60, what="the cycle's Valid condition")
    assert (cycle["status"], cycle["reason"]) == ("False", "Cycle")
    assert cycle["message"].startswith("spec.steps[0].requires: steps ")
    assert "form a cycle" in cycle["message"]
    unknown = eventually(lambda: marked("unknown-agent"), timeout=60, what="Valid")
    assert (unknown["status"], unknown["reason"]) == ("False", "AgentNotFound")
    assert unknown["message"].startswith(
        "spec.steps[1].agent: step 'ux' names Agent 'ux-expert', which does not exist"
    )
    for name in ("missing-requirement", "repeat-over-nothing", "cycle", "unknown-agent"):
        steps = bed.workflow(name)["status"]["steps"]
        assert {s["phase"] for s in steps} == {"Pending"}, name
    assert {agent: bed.added(agent) for agent in ("analyst", "pm")} == before

    # Fixed (the Agent now exists), the run starts.
    bed.apply_workflow(
        "unknown-agent",
        {
            "steps": [
                {"id": "brief", "agent": "analyst", "creates": "brief.md"},
                {"id": "ux", "agent": "architect", "creates": "ux.md", "requires": ["brief.md"]},
            ]
        },
    )
    assert bed.wait("unknown-agent", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"


# --- suspend -----------------------------------------------------------------------------


def test_a_suspended_run_starts_nothing_new_and_resumes_when_unset(bed: Bed) -> None:
    before = bed.added("flaky")
    bed.llm.release.clear()
    bed.apply_workflow(
        "paused",
        {
            "artifacts": {"integration": "artifacts"},
            "steps": [
                {
                    "id": "first",
                    "agent": "flaky",
                    "creates": "first.md",
                    "description": "paused-run BEHAVIOUR: hold",
                },
                {
                    "id": "second",
                    "agent": "flaky",
                    "creates": "second.md",
                    "requires": ["first.md"],
                    "description": "Then this.",
                },
            ],
        },
    )
    # The first step's attempt is with the model (held there) when the run is suspended.
    eventually(lambda: bed.llm.count("paused-run") > 0, timeout=60, what="the first attempt")
    bed.k("patch", "workflow", "paused", "--type=merge", "-p", '{"spec":{"suspend":true}}')

    def condition(type_: str) -> dict[str, Any] | None:
        conditions = (bed.workflow("paused").get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == type_), None)

    suspended = eventually(
        lambda: (c := condition("Suspended")) and c["status"] == "True" and c,
        timeout=60,
        what="the Suspended condition",
    )
    assert suspended["reason"] == "Suspended"
    bed.llm.release.set()  # the running attempt finishes

    def first_done() -> dict[str, Any] | None:
        status = bed.workflow("paused").get("status") or {}
        phases = {s["id"]: s["phase"] for s in status.get("steps") or []}
        return status if phases.get("first") == "Succeeded" else None

    status = eventually(first_done, timeout=60, what="the running attempt to finish")
    assert {s["id"]: s["phase"] for s in status["steps"]} == {
        "first": "Succeeded",
        "second": "Pending",
    }
    [ready] = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Suspended")
    # Counted on the bus: the suspended run sent the first step's task only.
    assert bed.added("flaky") - before == 1

    bed.k("patch", "workflow", "paused", "--type=merge", "-p", '{"spec":{"suspend":false}}')

    done = bed.wait("paused", "Succeeded", "Failed", timeout=120)
    assert done["status"]["phase"] == "Succeeded"
    assert [(s["id"], s["attempts"]) for s in done["status"]["steps"]] == [
        ("first", 1),
        ("second", 1),
    ]
    assert bed.added("flaky") - before == 2
    assert condition("Suspended")["status"] == "False"  # type: ignore[index]


# --- deletion ----------------------------------------------------------------------------


def test_deleting_a_running_workflow_cancels_its_outstanding_task(bed: Bed) -> None:
    bed.apply_workflow("doomed", _one_step("slow", timeoutSeconds=600))
    running = bed.wait("doomed", "Running")
    uid = running["metadata"]["uid"]
    assert "bmad.dev/workflow-cancel" in running["metadata"]["finalizers"]

    bed.k("delete", "workflow", "doomed", "--wait=true", "--timeout=60s")

    results = bed.results("flaky", uid)
    assert [(r["status"], r["error"]) for r in results.values()] == [
        ("cancelled", "the Workflow was deleted")
    ]


# --- crash safety ------------------------------------------------------------------------


def test_a_runtime_replica_killed_mid_step_leads_to_one_redelivery(bed: Bed) -> None:
    [first] = bed.runtimes.pop("steady")
    bed.runtimes["steady"] = []
    asked = bed.llm.count("replica-crash")
    bed.apply_workflow(
        "replica-crash",
        {
            "artifacts": {"integration": "artifacts"},
            "steps": [
                {
                    "id": "work",
                    "agent": "steady",
                    "creates": "work.md",
                    "description": "replica-crash BEHAVIOUR: delay",
                }
            ],
        },
    )
    eventually(lambda: bed.llm.count("replica-crash") > asked, timeout=60, what="the step to start")
    first.kill()  # mid-step: the model was asked, no result was stored
    second = agent_procs.wait_ready(
        agent_procs.spawn(
            bed.kubectl, bed.namespace, "steady", bed.workdir, replica=1, extra_env=SCRIPTED_ENV
        )
    )
    bed.runtimes["steady"].append(second)

    done = bed.wait("replica-crash", "Succeeded", "Failed", timeout=120)

    assert done["status"]["phase"] == "Succeeded"
    [work] = done["status"]["steps"]
    assert work["attempts"] == 1, "one attempt of the step, delivered twice"
    [(task_id, result)] = bed.results("steady", done["metadata"]["uid"]).items()
    assert task_id.endswith(":work:1")
    assert result["status"] == "succeeded"
    assert result["attempt"] == 2, "the second delivery (reclaimed from the dead replica)"
    assert result["consumer"] == second.consumer
    assert bed.llm.count("replica-crash") == asked + 2


def test_an_operator_killed_mid_run_resumes_without_dispatching_a_step_twice(
    bed: Bed, operator: operator_proc.OperatorProcess
) -> None:
    steps = [
        {
            "id": f"s{i}",
            "agent": "steady",
            "creates": f"s{i}.md",
            "description": "A step that takes a while. BEHAVIOUR: delay",
            **({"requires": [f"s{i - 1}.md"]} if i else {}),
        }
        for i in range(5)
    ]
    before = bed.added("steady")
    spec = {"artifacts": {"integration": "artifacts"}, "steps": steps}
    bed.apply_workflow("operator-crash", spec)

    def second_step_done() -> bool:
        status = bed.workflow("operator-crash").get("status") or {}
        return any(s["id"] == "s1" and s["phase"] == "Succeeded" for s in status.get("steps", []))

    eventually(second_step_done, timeout=60, what="s1 to succeed")
    operator.kill()
    operator.start()

    done = bed.wait("operator-crash", "Succeeded", "Failed", timeout=120)

    assert done["status"]["phase"] == "Succeeded"
    assert [s["attempts"] for s in done["status"]["steps"]] == [1] * 5
    # Counted on the bus: five tasks ever entered the stream, one result each, each
    # run by its first delivery.
    assert bed.added("steady") - before == 5
    results = bed.results("steady", done["metadata"]["uid"])
    assert sorted(results) == sorted(f"wf:{done['metadata']['uid']}:s{i}:1" for i in range(5))
    assert {r["attempt"] for r in results.values()} == {1}
