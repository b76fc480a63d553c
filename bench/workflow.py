"""Benchmark: the workflow engine's orchestration overhead per step, beyond the agents' time.

Two Workflows run on the test bed by the operator process, their Agents' runtimes as
`bmad runtime` processes on the echo provider (configured from what the operator
rendered, as in tests/e2e/test_workflows.py), artifacts in MinIO, tasks on Redis:

- a chain of N steps, each requiring the previous step's artifact. Overhead per step =
  (wall time from `kubectl apply` until the Workflow is Succeeded - the sum of the
  agents' own time) / N;
- a fan-out: one step lists N items, then one step repeats over them with maxParallel
  N. Overhead per item = (wall time - the listing step's own time - the longest item's
  own time) / N. Items beyond the agents' consumer concurrency wait for a slot, and that
  wait is counted as overhead here: the figure is an upper bound.

An agent's own time is what its runtime reports for the task (``latencyMs`` of the
step output): reading the required artifacts from MinIO, the model turn, storing the
artifact. Everything else (the operator's passes, status writes, Events, the bus, the
consumer picking the task up, the result announcement) is orchestration. The wall
time ends when `kubectl wait --for=condition=Succeeded` returns.

To say where the overhead goes, each row also has the operator's CPU, its Workflow
passes and their mean duration (its /metrics), the API writes it made per step, and,
from the bus (a task's stream entry id holds when it was sent; its result when it
finished): the runtime's share (sent to finished, minus its own time) and, for the
chain, the time from a step's result to the next step's task; last, the status writes
the operator made in the background (each with the Events it records; a pass hands its
status over and does not wait for it) and their mean duration; and what a run spends
once, not per step: from `kubectl apply` to its first task on the stream, and from its
last result to `kubectl wait` returning (kubectl's own start-up included in both).

Run on demand (not in CI), with the test bed up and no other operator running:

    set -a; eval "$(.venv/bin/bmad testbed up --services redis,minio)"; set +a
    .venv/bin/python bench/workflow.py --steps 50 --width 50 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import itertools
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from bmad_testbed import agents, operator_proc
from bmad_testbed.kubectl import Kubectl

REPO = Path(__file__).resolve().parent.parent
TARGET_MS = 100.0


def setup(kubectl: Kubectl, namespace: str, env: dict[str, str]) -> None:
    ns = kubectl.in_namespace(namespace)
    kubectl.run("create", "namespace", namespace)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds"},
        "data": {
            k: base64.b64encode(v.encode()).decode()
            for k, v in {
                "password": env["BMAD_REDIS_PASSWORD"],
                "accessKeyId": env["BMAD_S3_ACCESS_KEY"],
                "secretAccessKey": env["BMAD_S3_SECRET_KEY"],
            }.items()
        },
    }
    ns.apply(secret)
    for name, kind, block in (
        ("bus", "redis", {"host": "127.0.0.1", "port": int(env["BMAD_REDIS_PORT"])}),
        (
            "artifacts",
            "objectStorage",
            {
                "provider": "minio",
                "endpoint": env["BMAD_S3_ENDPOINT"],
                "region": env["BMAD_S3_REGION"],
                "bucket": f"bench-{namespace}",
                "createBucket": True,
                "versioning": True,
            },
        ),
    ):
        ns.apply(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Integration",
                "metadata": {"name": name},
                "spec": {"type": kind, kind: block, "secretRef": {"name": "creds"}},
            }
        )
    for name in ("lister", "worker"):
        ns.apply(
            {
                "apiVersion": "bmad.dev/v1alpha1",
                "kind": "Agent",
                "metadata": {"name": name},
                "spec": {
                    "role": "dev",
                    "model": {"provider": "echo", "name": "echo-1"},
                    "memory": {"store": "inProcess"},
                    "auth": {"mode": "none"},  # no auth0 Integration on the test bed
                    "integrations": ["bus", "artifacts"],
                },
            }
        )
    kubectl.run(
        "wait",
        "--for=condition=Ready",
        "integration/bus",
        "integration/artifacts",
        "-n",
        namespace,
        "--timeout=120s",
    )


def chain(steps: int) -> dict[str, Any]:
    return {
        "artifacts": {"integration": "artifacts"},
        "steps": [
            {
                "id": f"s{i}",
                "agent": "worker",
                "creates": f"s{i}.md",
                **({"requires": [f"s{i - 1}.md"]} if i else {}),
            }
            for i in range(steps)
        ],
    }


def fan_out(width: int) -> dict[str, Any]:
    items = ", ".join(f"'i{i}'" for i in range(width))
    return {
        "artifacts": {"integration": "artifacts"},
        "steps": [
            {
                "id": "list",
                "agent": "lister",
                "creates": "items",
                # The echo model repeats the prompt: this block lists the items.
                "description": f"List the items.\n```bmad\nitems: [{items}]\n```",
            },
            {
                "id": "each",
                "agent": "worker",
                "creates": "item.md",
                "requires": ["items"],
                "repeat": {"over": "items", "maxParallel": width},
            },
        ],
    }


@dataclass
class Run:
    wall: float  # seconds from `kubectl apply` until `kubectl wait` returned
    applied: float  # when `kubectl apply` started (epoch seconds)
    seen: float  # when `kubectl wait` returned (epoch seconds)


def run(kubectl: Kubectl, namespace: str, name: str, spec: dict[str, Any]) -> Run:
    """Apply the Workflow and time it until it is Succeeded."""
    body = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    applied = time.time()
    started = time.perf_counter()
    kubectl.apply(body)
    waited = subprocess.run(
        [
            kubectl.binary,
            f"--kubeconfig={kubectl.kubeconfig}",
            "wait",
            "--for=condition=Succeeded",
            f"workflow/{name}",
            "-n",
            namespace,
            "--timeout=600s",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if waited.returncode != 0:
        status = kubectl.json("get", "workflow", name, "-n", namespace).get("status")
        raise SystemExit(f"{name} did not succeed: {waited.stderr}\n{json.dumps(status)[:2000]}")
    return Run(elapsed, applied, time.time())


@dataclass
class Task:
    own: float  # the agent's own time (latencyMs), seconds
    sent: float  # when the operator put it on the stream (the entry id's milliseconds)
    finished: float  # when the runtime stored its result


def own_times(kubectl: Kubectl, client: redis.Redis, namespace: str, name: str) -> dict[str, Task]:
    """Each task's own time in the agent, and when it was sent and finished, by task id."""
    workflow = kubectl.json("get", "workflow", name, "-n", namespace)
    uid = workflow["metadata"]["uid"]
    agent_of = {s["id"]: s["agent"] for s in workflow["spec"]["steps"]}
    found: dict[str, Task] = {}
    for step in workflow["status"]["steps"]:
        units = [(None, step)] if not step.get("items") else [(i["name"], i) for i in step["items"]]
        for item, unit in units:
            task_id = f"wf:{uid}:{step['id']}:" + (f"{item}:" if item else "")
            task_id += str(unit["attempts"])
            raw = client.get(f"bmad:{namespace}:{agent_of[step['id']]}:results:{task_id}")
            result = json.loads(raw or "{}")
            found[task_id] = Task(
                own=int((result.get("output") or {}).get("latencyMs", 0)) / 1000,
                sent=int(str(result.get("message_id", "0-0")).split("-")[0]) / 1000,
                finished=float(result.get("finished_at") or 0),
            )
    return found


def passes(operator: operator_proc.OperatorProcess) -> tuple[float, float, float, float, float]:
    """(Workflow passes, their total seconds, API writes of any kind, background status
    writes, their total seconds) so far."""
    found = operator.metrics()
    count = found.get('bmad_operator_reconcile_duration_seconds_count{kind="Workflow"}', 0.0)
    total = found.get('bmad_operator_reconcile_duration_seconds_sum{kind="Workflow"}', 0.0)
    writes = sum(v for k, v in found.items() if k.startswith("bmad_operator_api_writes_total{"))
    status = 'bmad_operator_status_write_duration_seconds_{}{{kind="Workflow"}}'
    return (
        count,
        total,
        writes,
        found.get(status.format("count"), 0.0),
        found.get(status.format("sum"), 0.0),
    )


def figures(
    before: Any, spent: Any, counted: tuple[float, ...], now: tuple[float, ...], steps: int
) -> str:
    """Operator CPU per step (ms) | passes | mean pass (ms) | API writes per step."""
    cpu = (spent.user + spent.system - before.user - before.system) / steps * 1000
    count = now[0] - counted[0]
    mean = (now[1] - counted[1]) / count * 1000 if count else float("nan")
    return f"{cpu:.0f} | {count:.0f} | {mean:.0f} | {(now[2] - counted[2]) / steps:.1f}"


def status_writes(counted: tuple[float, ...], now: tuple[float, ...]) -> str:
    """Background status writes (with their Events) | their mean (ms)."""
    count = now[3] - counted[3]
    mean = (now[4] - counted[4]) / count * 1000 if count else float("nan")
    return f"{count:.0f} | {mean:.0f}"


def ends(timed: Run, tasks: list[Task]) -> str:
    """What a run spends once, not per step: from `kubectl apply` to the first task on
    the stream | from the last result stored to `kubectl wait` returning (ms)."""
    first = min(t.sent for t in tasks) - timed.applied
    last = timed.seen - max(t.finished for t in tasks)
    return f"{first * 1000:.0f} | {last * 1000:.0f}"


def split(tasks: list[Task]) -> tuple[float, float]:
    """Medians (ms) of: the runtime's share (sent to finished, minus its own time), and,
    for a chain, the operator's share (a result stored to the next task sent)."""
    runtime = statistics.median(t.finished - t.sent - t.own for t in tasks) * 1000
    ordered = sorted(tasks, key=lambda t: t.sent)
    gaps = [b.sent - a.finished for a, b in itertools.pairwise(ordered)]
    return runtime, (statistics.median(gaps) * 1000 if gaps else float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=50, help="length of the chain")
    parser.add_argument("--width", type=int, default=50, help="items of the fan-out")
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    env = dict(os.environ)
    for needed in ("BMAD_KUBECTL", "KUBECONFIG", "BMAD_REDIS_URL", "BMAD_S3_ENDPOINT"):
        if needed not in env:
            parser.error(f'set {needed}: run `eval "$(bmad testbed up)"` first')
    kubectl = Kubectl(env["BMAD_KUBECTL"], env["KUBECONFIG"])
    for path in sorted((REPO / "crds" / "bases").glob("bmad.dev_*.yaml")):
        kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(path))
    workdir = Path(tempfile.mkdtemp(prefix="bench-workflow-"))
    operator = operator_proc.OperatorProcess(
        kubeconfig=env["KUBECONFIG"], log_path=workdir / "operator.log", resync_seconds=60
    )
    namespace = f"bench-wf-{secrets.token_hex(3)}"
    runtimes: list[agents.AgentProcess] = []
    rows: list[str] = []
    client = redis.Redis.from_url(env["BMAD_REDIS_URL"], decode_responses=True)
    operator.start()
    try:
        setup(kubectl, namespace, env)
        runtimes = agents.start(kubectl, namespace, ["lister", "worker"], workdir, timeout=180)
        # A first small run warms the operator's connections and the runtimes up.
        run(kubectl, namespace, "warm-up", chain(2))
        cpu = psutil.Process(operator.pid)

        before, counted = cpu.cpu_times(), passes(operator)
        timed = run(kubectl, namespace, "chain", chain(args.steps))
        wall = timed.wall
        spent, now = cpu.cpu_times(), passes(operator)
        own = own_times(kubectl, client, namespace, "chain")
        mine = sum(t.own for t in own.values())
        overhead = (wall - mine) / args.steps
        runtime_ms, operator_ms = split(list(own.values()))
        rows.append(
            f"| chain | {args.steps} | {wall:.2f} | {mine:.2f} | {overhead * 1000:.0f} | "
            f"{figures(before, spent, counted, now, args.steps)} | "
            f"{runtime_ms:.0f} | {operator_ms:.0f} | {status_writes(counted, now)} | "
            f"{ends(timed, list(own.values()))} |"
        )

        before, counted = cpu.cpu_times(), passes(operator)
        timed = run(kubectl, namespace, "fan-out", fan_out(args.width))
        wall = timed.wall
        spent, now = cpu.cpu_times(), passes(operator)
        own = own_times(kubectl, client, namespace, "fan-out")
        listing = max(v.own for k, v in own.items() if ":list:" in k)
        longest = max(v.own for k, v in own.items() if ":each:" in k)
        overhead = (wall - listing - longest) / args.width
        runtime_ms, _ = split([v for k, v in own.items() if ":each:" in k])
        rows.append(
            f"| fan-out | 1 + {args.width} | {wall:.2f} | {listing + longest:.2f} | "
            f"{overhead * 1000:.0f} | "
            f"{figures(before, spent, counted, now, args.width)} | {runtime_ms:.0f} | - | "
            f"{status_writes(counted, now)} | {ends(timed, list(own.values()))} |"
        )
    finally:
        for one in runtimes:
            one.stop()
        operator.stop()
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)
        client.close()
    memory = psutil.virtual_memory().total / 2**30
    text = "\n".join(
        [
            f"\n### bench/workflow — {dt.date.today().isoformat()}\n",
            f"Machine: {os.cpu_count()} cores, {memory:.0f} GiB, "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
            "the test bed's control plane, Redis and MinIO, the operator and the two agents' "
            "runtimes (echo provider, one replica each) all on the same machine. "
            f"Target: < {TARGET_MS:.0f} ms of orchestration per step.\n",
            "| workflow | steps | wall s | agents' own s | overhead per step (ms) | "
            "operator CPU per step (ms) | Workflow passes | mean pass (ms) | "
            "API writes per step | runtime share, median (ms) | result to next task, "
            "median (ms) | status writes | mean status write (ms) | apply to first task (ms) | "
            "last result to Succeeded seen (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(text)
    if args.write:
        with args.write.open("a") as fh:
            fh.write(text + "\n")
    print(f"operator log: {workdir / 'operator.log'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
