"""Agent pods as real `bmad runtime` processes, for autoscaling tests and benchmarks.

kwok's nodes run no containers: a pod of an Agent's Deployment is Running on paper
and nothing serves. `ReplicaMirror` stands in for the kubelet. It follows the
Deployment's ``spec.replicas`` and keeps that many real `bmad runtime` processes
running, each started the way a pod would start: the container's environment from
the Deployment, ``agent.json`` from the Agent's ConfigMap, and every binding Secret
laid out as files under ``SERVICE_BINDING_ROOT``; only the HTTP address is moved to a
free port of 127.0.0.1. It lists the processes in a file_sd target file that the test
bed's Prometheus watches (``BMAD_PROMETHEUS_TARGETS_DIR``), so Prometheus scrapes them
as it would scrape pods. (On the real-node test bed, real pods do all of this.)

`GatedModel` is an OpenAI-compatible model server whose answers wait for a gate: while
it is closed, tasks stay on the agent's stream (delivered, not acknowledged), so a
queue depth holds as long as a test needs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Protocol, Self

from bmad_testbed import agents, procs

Obj = dict[str, Any]
POLL_SECONDS = 0.5


class Reader(Protocol):
    """Reads objects from the API server (the operator's ``kube.Kube`` does)."""

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None: ...


class GatedModel:
    """``GET /v1/models`` and ``POST /v1/chat/completions`` on 127.0.0.1; completions
    answer once `gate` is set."""

    def __init__(self, *, api_key: str, model: str = "gate-1") -> None:
        self.api_key = api_key
        self.model = model
        self.gate = threading.Event()
        self.waiting = 0
        self.answered = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self._reply(404, {"error": {"message": "not found"}})
                elif self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                    self._reply(401, {"error": {"message": "Incorrect API key provided"}})
                else:
                    self._reply(200, {"object": "list", "data": [{"id": owner.model}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                owner.waiting += 1
                owner.gate.wait()
                owner.waiting -= 1
                owner.answered += 1
                last = (request.get("messages") or [{}])[-1].get("content", "")
                self._reply(
                    200,
                    {
                        "id": "gated",
                        "object": "chat.completion",
                        "model": owner.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": f"done: {last}"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                    },
                )

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Replica:
    def __init__(
        self, index: int, proc: subprocess.Popen[bytes], port: int, env: dict[str, str]
    ) -> None:
        self.index = index
        self.proc = proc
        self.port = port
        self.env = env


class ReplicaMirror:
    """Runs as many `bmad runtime` processes as the Agent's Deployment has replicas."""

    def __init__(
        self, api: Reader, namespace: str, name: str, *, workdir: Path, targets_dir: Path
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.workdir = workdir
        self.target_file = targets_dir / f"{namespace}-{name}.json"
        self.replicas: list[_Replica] = []
        self.started = 0  # processes started so far
        self.history: list[int] = []  # every replica count mirrored, in order
        self._task: asyncio.Task[None] | None = None
        self._next = 0
        # A scale runs in a worker thread, which cancelling `_follow` does not stop: the
        # lock and the flag keep one still running at exit from starting a process
        # after the exit's scale to zero (it would outlive the test).
        self._scaling = threading.Lock()
        self._closed = False

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._closed = True
        await asyncio.to_thread(self._scale_to, 0, None)
        self.target_file.unlink(missing_ok=True)

    def spool_dir(self, index: int) -> Path:
        """Replica ``index``'s usage spool: its pod's emptyDir, kept across restarts."""
        return self.workdir / f"replica-{index}" / "usage-ledger"

    def restart(self, pid: int) -> None:
        """Start the replica whose process was ``pid`` (which has exited) again, on the
        same port and spool directory: what the kubelet does when a container of a
        pod dies (the pod, its emptyDir and its address stay)."""
        with self._scaling:
            [replica] = [r for r in self.replicas if r.proc.pid == pid]
            assert replica.proc.poll() is not None, "the replica is still running"
            replica.proc = self._spawn(replica.index, replica.env)

    @property
    def running(self) -> int:
        """Runtime processes alive, including those still shutting down."""
        return sum(1 for r in list(self.replicas) if r.proc.poll() is None)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{procs.log_tail(path, 20)}"
            for path in sorted(self.workdir.glob("runtime-*.log"))
        )

    async def _follow(self) -> None:
        while True:
            deployment = await self.api.get("Deployment", self.namespace, self.name)
            if deployment is not None:
                wanted = int((deployment.get("spec") or {}).get("replicas") or 0)
                if wanted != len(self.replicas):
                    pod = await self._pod_files(deployment) if wanted else None
                    await asyncio.to_thread(self._scale_to, wanted, pod)
            await asyncio.sleep(POLL_SECONDS)

    async def _pod_files(self, deployment: Obj) -> Obj:
        """What a pod of this Deployment would mount, laid out under the workdir."""
        template = deployment["spec"]["template"]["spec"]
        [container] = [c for c in template["containers"] if c["name"] == "agent"]
        env = {v["name"]: v["value"] for v in container.get("env") or [] if "value" in v}
        for var in container.get("env") or []:
            # As the kubelet does: a variable from a Secret's key (the usage ledger's password).
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                found = await self.api.get("Secret", self.namespace, ref["name"])
                assert found is not None, f"Secret {ref['name']} does not exist"
                env[var["name"]] = base64.b64decode(found["data"][ref["key"]]).decode()
        config = await self.api.get("ConfigMap", self.namespace, f"{self.name}-config")
        assert config is not None, "the Agent's ConfigMap does not exist"
        agent_json = self.workdir / "agent.json"
        agent_json.write_text(config["data"]["agent.json"])
        bindings = self.workdir / "bindings"
        shutil.rmtree(bindings, ignore_errors=True)
        bindings.mkdir()
        for volume in template.get("volumes") or []:
            secret_name = (volume.get("secret") or {}).get("secretName")
            mount = next(
                (m for m in container.get("volumeMounts") or [] if m["name"] == volume["name"]),
                None,
            )
            if not secret_name or mount is None:
                continue
            secret = await self.api.get("Secret", self.namespace, secret_name)
            assert secret is not None, f"Secret {secret_name} does not exist"
            folder = bindings / Path(mount["mountPath"]).name
            folder.mkdir()
            for key, value in (secret.get("data") or {}).items():
                (folder / key).write_bytes(base64.b64decode(value))
        env["BMAD_AGENT_CONFIG"] = str(agent_json)
        env["SERVICE_BINDING_ROOT"] = str(bindings)
        return env

    def _scale_to(self, wanted: int, env: Obj | None) -> None:
        with self._scaling:
            self._scale_locked(0 if self._closed else wanted, env)

    def _scale_locked(self, wanted: int, env: Obj | None) -> None:
        self.history.append(wanted)
        while len(self.replicas) > wanted:
            # Listed until it has exited: a runtime shutting down may still answer a task
            # it read before the stop, so `running` counts it as a pod still terminating.
            _stop(self.replicas[-1].proc)
            self.replicas.pop()
        while len(self.replicas) < wanted:
            assert env is not None
            port = procs.free_port()
            base = {k: v for k, v in os.environ.items() if not k.startswith("BMAD_")}
            full = {**base, **env, "BMAD_HTTP_HOST": "127.0.0.1", "BMAD_HTTP_PORT": str(port)}
            self._next += 1
            if agents.SPOOL_ENV in full:
                # The usage spool in the replica's own emptyDir, as in its pod.
                full[agents.SPOOL_ENV] = str(self.spool_dir(self._next))
            self.replicas.append(_Replica(self._next, self._spawn(self._next, full), port, full))
        self._write_targets()

    def _spawn(self, index: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = agents.launch(env, self.workdir / f"runtime-{index}.log")
        self.started += 1
        return proc

    def _write_targets(self) -> None:
        groups = [
            {
                "targets": [f"127.0.0.1:{r.port}"],
                "labels": {"pod": f"{self.name}-{r.index}", "job": "bmad-runtime"},
            }
            for r in self.replicas
        ]
        tmp = self.target_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.target_file)  # Prometheus never reads half a file


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
