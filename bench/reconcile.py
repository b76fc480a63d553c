"""Benchmark: N Agents applied at once → seconds until all Ready, against the same owned
objects applied straight to the API server by parallel server-side-apply streams →
seconds until all Deployments are Available. Also what the operator cost doing it.

The baseline is the floor an operator can reach on this API server: the objects the
operator's own builders render (ServiceAccount, ConfigMap, Deployment, Service,
PodDisruptionBudget per Agent), applied by `--streams` concurrent server-side-apply
streams (8 by default: the concurrency beyond which this machine's apiserver gets no
faster), each stream applying one Agent's objects in order. The Agents themselves are
applied the same way in the operator's run. Both runs are timed by a watch, not by
polling lists, so the timer itself loads the apiserver little.

For every run it records: both times and their ratio, the operator's peak RSS and its
RSS when it started (and so bytes per Agent), its CPU seconds (user + system of its
process tree, read from /proc), and the requests the apiserver saw from the operator's
user, by verb (from the test bed's audit log, `BMAD_AUDIT_LOG`).

`--steady-minutes M` leaves the Agents alone for M minutes after they are all Ready and
records what the operator does meanwhile: its writes (should be none), its memory every
few seconds (flat or not) and its CPU per resync pass.

Run on demand (not in CI), with the test bed up (enough kwok nodes for N pods, at
1,000 pods per node: `--nodes 3` for 1,000 Agents, `--nodes 7` for 5,000):

    set -a; eval "$(.venv/bin/bmad testbed up --services none --nodes 7)"; set +a
    .venv/bin/python bench/reconcile.py --agents 1000 5000 --write docs/benchmarks.md
    .venv/bin/python bench/reconcile.py --agents 1000 --no-baseline --steady-minutes 10 \\
        --write docs/benchmarks.md

Each size uses fresh namespaces, deleted (and waited for) before the next run starts;
the operator is started fresh for each size.

`--fresh-bed NODES` gives every timed part (each size's baseline, each size's operator
run) a control plane of its own: the bench starts a test bed (`bmad testbed up
--services none --nodes NODES`, in a directory under `BMAD_TESTBED_DIR` or /tmp) before
the part and stops and removes it after, so neither part runs on what the other left
behind (etcd's history of thousands of deleted objects, the garbage collector's and the
controllers' backlog). Without it both parts share the test bed of the environment,
the baseline first, and at 5,000 Agents the second part pays for the first (see
docs/benchmarks.md). No test bed needs to be up:

    .venv/bin/python bench/reconcile.py --agents 1000 5000 --fresh-bed 7 \\
        --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import report_file  # bench/, beside this script
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator import diff, kube
from bmad_operator.builders import agent as builders
from bmad_testbed import audit, operator_proc
from bmad_testbed import testbed as testbed_mod
from bmad_testbed.kubectl import Kubectl

ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")
REPO = Path(__file__).resolve().parent.parent
FIELD_MANAGER = "bmad-bench"
MiB = 2**20


def agent_doc(name: str, namespace: str, i: int) -> dict[str, Any]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "role": ROLES[i % len(ROLES)],
            "model": {"provider": "echo", "name": "echo-1"},
            "memory": {"store": "inProcess"},
            "auth": {"mode": "none"},
            "replicas": 1,
        },
    }


def owned_objects(namespace: str, n: int) -> list[list[dict[str, Any]]]:
    """What the operator's builders render for each of the n Agents, one list per Agent,
    without owner references (there is no Agent to own them in the baseline)."""
    per_agent = []
    for i in range(n):
        doc = agent_doc(f"a-{i:05d}", namespace, i)
        body = {
            "metadata": {
                "name": doc["metadata"]["name"],
                "namespace": namespace,
                "uid": "00000000-0000-0000-0000-000000000000",
            }
        }
        spec = agent_api.AgentSpec.model_validate(doc["spec"])
        objs = builders.build_all(body, spec, image="bmad-operator:0.1.0")
        for obj in objs:
            obj["metadata"].pop("ownerReferences", None)
        per_agent.append(objs)
    return per_agent


# --- the API server ---------------------------------------------------------------------


async def api_client(kubeconfig: str, pool: int) -> k8s_client.ApiClient:
    cfg = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    api = k8s_client.ApiClient(configuration=cfg)
    session = getattr(api.rest_client, "pool_manager", None)
    if session is not None and hasattr(session, "_trust_env"):
        session._trust_env = False  # no ~/.netrc or proxy lookups per request
    return api


async def _request(
    api: k8s_client.ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, str]] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    seconds: float = 120,
) -> bytes:
    resp = await api.call_api(
        path,
        method,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=seconds,
    )
    raw: bytes = await resp.read()
    if resp.status >= 400:
        raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")
    return raw


async def apply_parallel(
    api: k8s_client.ApiClient, groups: Sequence[Sequence[Mapping[str, Any]]], *, streams: int
) -> None:
    """Server-side apply every group's objects in order, `streams` groups at a time."""
    queue: asyncio.Queue[Sequence[Mapping[str, Any]]] = asyncio.Queue()
    for group in groups:
        queue.put_nowait(group)

    async def stream() -> None:
        while True:
            try:
                group = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for obj in group:
                meta = obj["metadata"]
                path = kube.path_for(obj["kind"], meta.get("namespace"), meta["name"])
                for attempt in range(5):
                    try:
                        await _request(
                            api,
                            "PATCH",
                            path,
                            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                            body=obj,
                            content_type="application/apply-patch+yaml",
                        )
                        break
                    except (TimeoutError, RuntimeError, OSError):
                        if attempt == 4:
                            raise
                        await asyncio.sleep(1 + attempt)

    await asyncio.gather(*(stream() for _ in range(streams)))


def apply_parallel_kubectl(
    kubectl: Kubectl, groups: Sequence[Sequence[Mapping[str, Any]]], *, streams: int
) -> None:
    """The same with `streams` kubectl processes, each applying its share as one List."""
    shares: list[list[Mapping[str, Any]]] = [[] for _ in range(streams)]
    for i, group in enumerate(groups):
        shares[i % streams].extend(group)
    procs = []
    for share in shares:
        if not share:
            continue
        proc = subprocess.Popen(
            [
                kubectl.binary,
                f"--kubeconfig={kubectl.kubeconfig}",
                "apply",
                "--server-side",
                "--force-conflicts",
                f"--field-manager={FIELD_MANAGER}",
                "-f",
                "-",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": share}))
        proc.stdin.close()
        procs.append(proc)
    for proc in procs:
        assert proc.stderr is not None
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise RuntimeError(f"kubectl apply failed: {err[-500:]}")


def _condition_true(obj: Mapping[str, Any], kind: str) -> bool:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return True
    return False


async def watch_until(
    api: k8s_client.ApiClient,
    path: str,
    *,
    count: int,
    ready: Callable[[Mapping[str, Any]], bool],
    within: float,
) -> float:
    """Seconds (monotonic clock) at which `count` objects under `path` were ready.

    One list, then a watch from its resourceVersion; a watch that ends (server timeout,
    410 Gone) starts over with a new list.
    """
    done: set[str] = set()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = json.loads(await _request(api, "GET", path, seconds=300))
        done = {i["metadata"]["name"] for i in body.get("items", []) if ready(i)}
        if len(done) >= count:
            return time.monotonic()
        rv = body["metadata"]["resourceVersion"]
        remaining = max(1, int(deadline - time.monotonic()))
        stream = await api.call_api(
            path,
            "GET",
            query_params=[
                ("watch", "1"),
                ("resourceVersion", rv),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(min(remaining, 600))),
            ],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=min(remaining, 600) + 30,
        )
        try:
            async for line in stream.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    break  # 410 Gone and the like: list again
                name = (obj.get("metadata") or {}).get("name")
                if kind in ("ADDED", "MODIFIED") and name and ready(obj):
                    done.add(name)
                elif kind == "DELETED" and name:
                    done.discard(name)
                if len(done) >= count:
                    return time.monotonic()
        finally:
            stream.release()
    raise TimeoutError(f"only {len(done)} of {count} under {path} were ready within {within}s")


# --- the operator's process ----------------------------------------------------------


@dataclasses.dataclass
class Usage:
    peak_rss: int = 0
    samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return int(
        proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    )


def tree_cpu(pid: int) -> float:
    """User + system seconds of the process, its live descendants and its reaped children
    (what /proc/<pid>/stat and the children's stat files hold)."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = child.cpu_times()
            total += ct.user + ct.system
    return float(total)


class Sampler(threading.Thread):
    """The RSS of the operator's process tree every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.usage = Usage()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                rss = tree_rss(self.pid)
            except psutil.Error:
                continue
            self.usage.peak_rss = max(self.usage.peak_rss, rss)
            self.usage.samples.append((time.monotonic(), rss))

    def stop(self) -> Usage:
        self.stop_event.set()
        self.join()
        return self.usage


class LoadMeter(threading.Thread):
    """The machine's 1-minute load average, sampled every second: how shared it was."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.values: list[float] = []
        self.stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            self.values.append(os.getloadavg()[0])

    def stop(self) -> float:
        self.stop_event.set()
        self.join()
        return statistics.fmean(self.values) if self.values else os.getloadavg()[0]


# The test bed's control plane, by the program each process runs.
CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


def control_plane_cpu() -> dict[str, float]:
    """User + system seconds so far of the test bed's control-plane processes, by program.

    Only the processes of this environment's test bed (`BMAD_TESTBED_DIR` in their
    command line) when it names one, so another test bed on the machine is not counted."""
    bed = os.environ.get("BMAD_TESTBED_DIR")
    seconds: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        program = os.path.basename(cmdline[0]) if cmdline else ""
        if program not in CONTROL_PLANE or (bed and not any(bed in a for a in cmdline)):
            continue
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            seconds[program] = seconds.get(program, 0.0) + t.user + t.system
    return seconds


def own_cpu() -> float:
    """User + system seconds so far of this process (the apply streams and the watches)."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def cpu_spent(before: Mapping[str, float], client_before: float) -> dict[str, float]:
    """The control plane's CPU seconds by program since `before`, and this process's as
    `bench client`."""
    after = control_plane_cpu()
    spent = {name: after[name] - before.get(name, 0.0) for name in CONTROL_PLANE if name in after}
    spent["bench client"] = own_cpu() - client_before
    return spent


# --- one run ------------------------------------------------------------------------------


@dataclasses.dataclass
class BaselineRun:
    seconds: float
    load: float
    # CPU seconds during the run by program: the control plane and this process
    cpu_by_process: dict[str, float]


@dataclasses.dataclass
class OperatorRun:
    seconds: float
    cpu: float
    start_rss: int
    peak_rss: int
    verbs: Counter[str]
    writes: Counter[str]
    load: float
    steady: Steady | None = None
    # CPU seconds during the run by program: the control plane and this process
    cpu_by_process: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Steady:
    minutes: float
    writes: Counter[str]
    verbs: Counter[str]
    samples: list[tuple[float, int]]
    cpu: float
    passes: float
    resync_seconds: float

    @property
    def rss_mib(self) -> list[float]:
        return [rss / MiB for _, rss in self.samples]

    def growth_mib(self) -> float:
        """Mean of the last tenth of the samples minus the mean of the first tenth."""
        values = self.rss_mib
        k = max(1, len(values) // 10)
        return statistics.fmean(values[-k:]) - statistics.fmean(values[:k])

    def slope_mib_per_min(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        xs = [(t - self.samples[0][0]) / 60 for t, _ in self.samples]
        ys = self.rss_mib
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kubeconfig = os.environ["KUBECONFIG"]
        self.operator_kc = os.environ.get("BMAD_OPERATOR_KUBECONFIG", self.kubeconfig)
        self.user = os.environ.get("BMAD_OPERATOR_USER", "")
        self.audit_log = os.environ.get("BMAD_AUDIT_LOG", "")
        self.kubectl = Kubectl(os.environ.get("BMAD_KUBECTL", "kubectl"), self.kubeconfig)
        # the operator's logs; a fresh bed's directory goes with it, so they go beside it
        logs = os.environ.get("BMAD_BENCH_DIR") or os.environ.get("BMAD_TESTBED_DIR", "/tmp")  # noqa: S108
        self.tmp = Path(logs) / "bench"

    # setup -------------------------------------------------------------------------
    def prepare(self) -> None:
        for path in sorted((REPO / "crds" / "bases").glob("bmad.dev_*.yaml")):
            self.kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(path))
        self.kubectl.run(
            "wait", "--for=condition=Established", "crd/agents.bmad.dev", "--timeout=60s"
        )
        if self.user:
            self.bind_operator_role()

    def bind_operator_role(self) -> None:
        """The operator runs as its own user, bound to the ClusterRole of manifests/rbac."""
        rendered = self.kubectl.out("kustomize", str(REPO / "manifests" / "rbac"))
        for doc in yaml.safe_load_all(rendered):
            if doc and doc.get("kind") == "ClusterRole":
                self.kubectl.run(
                    "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(doc)
                )
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "bmad-operator-testbed"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "bmad-operator",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": self.user}
            ],
        }
        self.kubectl.run(
            "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(binding)
        )

    def check_capacity(self, n: int) -> None:
        """Every Agent's pod needs a place on a kwok node, or no Deployment becomes Available."""
        nodes = self.kubectl.json("get", "nodes")["items"]
        capacity = sum(
            int(diff.quantity((nd.get("status") or {}).get("allocatable", {}).get("pods", 0)) or 0)
            for nd in nodes
        )
        pods = len(self.kubectl.json("get", "pods", "--all-namespaces")["items"])
        if capacity - pods < n:
            per_node = max(1, capacity // max(1, len(nodes)))
            need = math.ceil((n + pods) / per_node)
            raise SystemExit(
                f"{n} Agents need {n} pods but the nodes hold {capacity} and {pods} exist: "
                f"start the test bed with `bmad testbed up --nodes {need}` (or more)"
            )

    def fresh_namespace(self, prefix: str, n: int) -> str:
        ns = f"{prefix}-{n}-{secrets.token_hex(2)}"
        self.kubectl.run("create", "namespace", ns)
        return ns

    def delete_namespace(self, ns: str, *, wait: bool = True) -> None:
        """Delete and wait until it is gone, so its garbage collection does not run
        during the next measurement (``wait=False`` after the last one)."""
        self.kubectl.run("delete", "namespace", ns, "--wait=false", check=False)
        if not wait or self.args.fresh_bed:  # a fresh bed is thrown away after the part
            return
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            if not self.kubectl.exists("namespace", ns):
                return
            time.sleep(5)
        print(f"namespace {ns} still there after an hour; going on", file=sys.stderr)

    # the baseline ------------------------------------------------------------------
    async def baseline(self, n: int) -> BaselineRun:
        ns = self.fresh_namespace("bench-direct", n)
        groups = owned_objects(ns, n)
        api = await api_client(self.kubeconfig, pool=self.args.streams + 4)
        try:
            path = kube.path_for("Deployment", ns)
            watcher = asyncio.create_task(
                watch_until(
                    api,
                    path,
                    count=n,
                    ready=lambda o: _condition_true(o, "Available"),
                    within=self.args.timeout,
                )
            )
            await asyncio.sleep(0.5)  # the watch is open before the first object lands
            load = LoadMeter()
            cpu_before, client_before = control_plane_cpu(), own_cpu()
            start = time.monotonic()
            if self.args.client == "kubectl":
                await asyncio.to_thread(
                    apply_parallel_kubectl, self.kubectl, groups, streams=self.args.streams
                )
            else:
                await apply_parallel(api, groups, streams=self.args.streams)
            applied = time.monotonic() - start
            end = await watcher
            spent = cpu_spent(cpu_before, client_before)
            print(f"baseline {n}: applied in {applied:.1f}s", file=sys.stderr)
            return BaselineRun(end - start, load.stop(), spent)
        finally:
            await api.close()
            await asyncio.to_thread(self.delete_namespace, ns)

    # the operator ------------------------------------------------------------------
    async def operator(self, n: int) -> OperatorRun:
        ns = self.fresh_namespace("bench-op", n)
        self.tmp.mkdir(parents=True, exist_ok=True)
        op = operator_proc.OperatorProcess(
            kubeconfig=self.operator_kc,
            log_path=self.tmp / f"operator-{n}-{ns}.log",
            resync_seconds=self.args.resync_seconds,
            workers=self.args.workers,
            # a shared 2-core machine can take minutes to start it; the clock starts later
            start_timeout=300,
        )
        mark = audit.mark(self.audit_log) if self.audit_log else None
        api = await api_client(self.kubeconfig, pool=self.args.streams + 4)
        sampler: Sampler | None = None
        steady: Steady | None = None
        try:
            await asyncio.to_thread(op.start)
            assert op.pid is not None
            pid = op.pid
            await asyncio.sleep(2)  # its initial lists are in
            start_rss = tree_rss(pid)
            cpu_before = tree_cpu(pid)
            sampler = Sampler(pid)
            sampler.start()
            groups = [[agent_doc(f"a-{i:05d}", ns, i)] for i in range(n)]
            path = kube.path_for("Agent", ns)
            watcher = asyncio.create_task(
                watch_until(
                    api,
                    path,
                    count=n,
                    ready=lambda o: _condition_true(o, "Ready"),
                    within=self.args.timeout,
                )
            )
            await asyncio.sleep(0.5)
            load = LoadMeter()
            cp_before, client_before = control_plane_cpu(), own_cpu()
            start = time.monotonic()
            await apply_parallel(api, groups, streams=self.args.streams)
            applied = time.monotonic() - start
            print(f"operator {n}: Agents applied in {applied:.1f}s", file=sys.stderr)
            end = await watcher
            mean_load = load.stop()
            seconds = end - start
            cpu = tree_cpu(pid) - cpu_before
            by_process = cpu_spent(cp_before, client_before)
            usage = sampler.stop()
            events = audit.entries_after(mark) if mark else []
            verbs = audit.requests_by_verb(events, user=self.user)
            writes = audit.write_requests(events, user=self.user)
            if self.args.steady_minutes:
                steady = await self.steady(op, pid, n)
            if self.args.tracemalloc_dir:
                await asyncio.to_thread(op.stop)
                await self.heap_profile(n, ns, Path(self.args.tracemalloc_dir))
        finally:
            if sampler is not None and sampler.is_alive():
                sampler.stop()
            await api.close()
            await asyncio.to_thread(op.stop)
            # Nothing is measured after the last size: no need to wait for its GC.
            last = n == self.args.agents[-1]
            await asyncio.to_thread(self.delete_namespace, ns, wait=not last)
        return OperatorRun(
            seconds,
            cpu,
            start_rss,
            usage.peak_rss,
            verbs,
            writes,
            mean_load,
            steady,
            cpu_by_process={**by_process, "operator": cpu},
        )

    async def heap_profile(self, n: int, ns: str, folder: Path) -> None:
        """With the N Agents Ready, restart the operator twice: once plainly, for its RSS
        once it has caught up, and once under tracemalloc, for a snapshot at that point.
        (Tracing the rollout itself is too slow on a shared 2-core machine; this shows
        what a synced operator holds per Agent, the bulk of the peak.)"""
        for traced in (False, True):
            env = {"BMAD_OPERATOR_TRACEMALLOC_DIR": str(folder)} if traced else {}
            op = operator_proc.OperatorProcess(
                kubeconfig=self.operator_kc,
                log_path=self.tmp / f"operator-{n}-{ns}-{'traced' if traced else 'restart'}.log",
                resync_seconds=self.args.resync_seconds,
                workers=self.args.workers,
                extra_env=env,
                start_timeout=300,
            )
            try:
                await asyncio.to_thread(op.start)
                assert op.pid is not None
                deadline = time.monotonic() + self.args.timeout
                while _agent_reconciles(op) < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the restarted operator did not reconcile every Agent")
                    await asyncio.sleep(2)
                await asyncio.sleep(5)  # the last status writes and events settle
                rss = tree_rss(op.pid)
                if traced:
                    path = await asyncio.to_thread(snapshot, op.pid, folder)
                    print(
                        f"restarted under tracemalloc, all {n} Agents reconciled: RSS "
                        f"{rss / MiB:.0f} MiB (tracing included); snapshot {path}",
                        file=sys.stderr,
                    )
                else:
                    print(
                        f"restarted, all {n} Agents reconciled: RSS {rss / MiB:.0f} MiB",
                        file=sys.stderr,
                    )
            finally:
                await asyncio.to_thread(op.stop)

    async def steady(self, op: operator_proc.OperatorProcess, pid: int, n: int) -> Steady:
        """Leave the Ready Agents alone; watch what the operator does meanwhile."""
        minutes = float(self.args.steady_minutes)
        mark = audit.mark(self.audit_log) if self.audit_log else None
        reconciles_before = _agent_reconciles(op)
        cpu_before = tree_cpu(pid)
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            samples.append((time.monotonic(), tree_rss(pid)))
            await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        samples.append((time.monotonic(), tree_rss(pid)))
        cpu = tree_cpu(pid) - cpu_before
        passes = (_agent_reconciles(op) - reconciles_before) / n
        events = audit.entries_after(mark) if mark else []
        return Steady(
            minutes=minutes,
            writes=audit.write_requests(events, user=self.user),
            verbs=audit.requests_by_verb(events, user=self.user),
            samples=samples,
            cpu=cpu,
            passes=passes,
            resync_seconds=self.args.resync_seconds,
        )


def snapshot(pid: int, folder: Path, timeout: float = 600) -> Path:
    """Ask the operator for a tracemalloc snapshot (SIGUSR1) and wait until it is written."""
    before = set(folder.glob(f"tracemalloc-{pid}-*.snap"))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(folder.glob(f"tracemalloc-{pid}-*.snap")) - before
        if new:
            return new.pop()
        time.sleep(1)
    raise TimeoutError(f"the operator wrote no snapshot into {folder} within {timeout}s")


def _agent_reconciles(op: operator_proc.OperatorProcess) -> float:
    return sum(
        v
        for k, v in op.metrics().items()
        if k.startswith("bmad_operator_reconciles_total{") and 'kind="Agent"' in k
    )


# --- the report ---------------------------------------------------------------------------


def _verbs(counts: Counter[str]) -> str:
    return ", ".join(f"{verb} {count:,}" for verb, count in counts.most_common()) or "none"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        version = json.loads(
            subprocess.run(
                [os.environ.get("BMAD_KUBECTL", "kubectl"), "version", "-o", "json"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout
        )["serverVersion"]["gitVersion"]
    except (OSError, subprocess.SubprocessError, KeyError, ValueError):
        version = "?"
    return (
        f"Machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{cpu}, Python {platform.python_version()}; test bed control plane (kube-apiserver "
        f"{version}, etcd, kwok nodes) on the same machine."
    )


CLIENTS = {"kubectl": "kubectl processes", "python": "kubernetes_asyncio coroutines"}


def report(
    args: argparse.Namespace,
    rows: list[tuple[int, BaselineRun | None, OperatorRun]],
    machine_line: str,
) -> str:
    beds = (
        f"Every timed part on a control plane of its own (`--fresh-bed {args.fresh_bed}`: "
        f"a test bed with {args.fresh_bed} kwok nodes started before the part, stopped and "
        "removed after it)."
        if args.fresh_bed
        else "Both parts on one test bed, the baseline first, its namespace deleted and "
        "collected before the operator's run."
    )
    lines = [
        f"\n### bench/reconcile — {dt.date.today().isoformat()}\n",
        machine_line,
        beds,
        f"Baseline: the builders' objects applied by {args.streams} concurrent server-side-"
        f"apply streams ({CLIENTS[args.client]}), timed to all Deployments Available. "
        f"Operator: {args.workers} workers, resync "
        f"{args.resync_seconds:g}s, the Agents applied by the same {args.streams} streams, "
        "timed to all Agents Ready. CPU: user + system seconds of the operator's process tree "
        "during the run; RSS per Agent: (peak - RSS at start) / N; requests: the operator's "
        "user in the audit log, from its start to all Ready; load: the machine's mean "
        "1-minute load average during each timed part (2 cores: above 2, other work "
        "shared the machine).\n",
        "| agents | baseline → all Available (s) | operator → all Ready (s) | ratio | "
        "operator CPU (s) | RSS at start / peak (MiB) | RSS per Agent (KiB) | "
        "apiserver requests by verb | load (baseline / operator) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for n, base, run in rows:
        ratio = f"{run.seconds / base.seconds:.2f}" if base else "—"
        per_agent = (run.peak_rss - run.start_rss) / n / 1024
        lines.append(
            f"| {n:,} | {f'{base.seconds:.1f}' if base else '—'} | {run.seconds:.1f} | {ratio} | "
            f"{run.cpu:.1f} | {run.start_rss / MiB:.0f} / {run.peak_rss / MiB:.0f} | "
            f"{per_agent:.0f} | {_verbs(run.verbs)} | "
            f"{f'{base.load:.1f}' if base else '—'} / {run.load:.1f} |"
        )
    lines += cpu_table(rows)
    steady = [(n, run.steady) for n, _, run in rows if run.steady]
    if steady:
        lines += [
            "",
            "Steady state: the Agents left alone after all were Ready; RSS sampled every 5 s; "
            "growth: mean of the last tenth of the samples - mean of the first tenth; CPU per "
            "resync pass: the operator's CPU over the window / (Agent reconciles in it / N).\n",
            "| agents | minutes | resync (s) | writes by the operator | requests by verb | "
            "RSS min / max (MiB) | growth (MiB) | slope (MiB/min) | CPU (s) | passes | "
            "CPU per pass (s) |",
            "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n, s in steady:
            assert s is not None
            writes = _verbs(s.writes) if s.writes else "**0**"
            per_pass = f"{s.cpu / s.passes:.2f}" if s.passes else "—"
            lines.append(
                f"| {n:,} | {s.minutes:g} | {s.resync_seconds:g} | {writes} | {_verbs(s.verbs)} "
                f"| {min(s.rss_mib):.0f} / {max(s.rss_mib):.0f} | {s.growth_mib():+.1f} | "
                f"{s.slope_mib_per_min():+.2f} | {s.cpu:.1f} | {s.passes:.1f} | {per_pass} |"
            )
    return "\n".join(lines) + "\n"


def cpu_table(
    rows: Sequence[tuple[int, BaselineRun | None, OperatorRun]],
) -> list[str]:
    """Where the machine's CPU went during each timed part, by program."""
    columns = [*CONTROL_PLANE, "operator", "bench client"]
    lines = [
        "",
        "CPU seconds (user + system) during each timed part, by program: the test bed's "
        "control plane, the operator's process tree, and the bench's own process (the "
        "apply streams and the watch that times the part). Total over wall time: the "
        "cores they kept busy on average.\n",
        "| agents | part | wall (s) | " + " | ".join(columns) + " | total | cores busy |",
        "|---:|---|---:|" + "---:|" * len(columns) + "---:|---:|",
    ]
    for n, base, run in rows:
        parts = [("baseline", base.seconds, base.cpu_by_process)] if base else []
        parts.append(("operator", run.seconds, run.cpu_by_process))
        for part, wall, spent in parts:
            if not spent:
                continue
            total = sum(spent.values())
            cells = " | ".join(f"{spent[c]:.1f}" if c in spent else "—" for c in columns)
            lines.append(
                f"| {n:,} | {part} | {wall:.1f} | {cells} | {total:.1f} | {total / wall:.2f} |"
            )
    return lines


@contextlib.asynccontextmanager
async def fresh_bed(args: argparse.Namespace, part: str) -> AsyncIterator[None]:
    """A control plane of its own for one timed part, its env in os.environ meanwhile."""
    base = Path(os.environ.get("BMAD_TESTBED_DIR") or "/tmp")  # noqa: S108
    directory = base / f"bench-bed-{part}-{secrets.token_hex(2)}"
    saved = dict(os.environ)
    # without this, `up` would take the environment's KUBECONFIG for a cluster of the
    # user's own and start no control plane
    os.environ.pop("KUBECONFIG", None)
    os.environ["BMAD_TESTBED_DIR"] = str(directory)
    os.environ["BMAD_BENCH_DIR"] = str(base)
    try:
        started = time.monotonic()
        env = await asyncio.to_thread(
            testbed_mod.up, with_services=[], nodes=args.fresh_bed, directory=directory
        )
        os.environ.update(env)
        print(
            f"{part}: a fresh test bed in {directory} ({time.monotonic() - started:.0f}s)",
            file=sys.stderr,
        )
        yield
    finally:
        await asyncio.to_thread(testbed_mod.down, directory=directory)
        shutil.rmtree(directory, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


@contextlib.asynccontextmanager
async def bed_for(args: argparse.Namespace, part: str) -> AsyncIterator[Bench]:
    """The Bench of one timed part: on a fresh test bed (`--fresh-bed`) or the env's."""
    async with fresh_bed(args, part) if args.fresh_bed else contextlib.nullcontext():
        bench = Bench(args)
        bench.prepare()
        yield bench


async def amain(args: argparse.Namespace) -> int:
    rows: list[tuple[int, BaselineRun | None, OperatorRun]] = []
    machine_line = ""
    for n in args.agents:
        base: BaselineRun | None = None
        if not args.no_baseline:
            async with bed_for(args, f"baseline-{n}") as bench:
                bench.check_capacity(n)
                machine_line = machine_line or machine()
                base = await bench.baseline(n)
            print(
                f"baseline {n} ({args.client}): all Available after {base.seconds:.1f}s, "
                f"load {base.load:.1f}",
                file=sys.stderr,
            )
        if args.baseline_only:
            continue
        async with bed_for(args, f"operator-{n}") as bench:
            bench.check_capacity(n)
            machine_line = machine_line or machine()
            run = await bench.operator(n)
        print(
            f"operator {n}: all Ready after {run.seconds:.1f}s, CPU {run.cpu:.1f}s, RSS "
            f"{run.start_rss / MiB:.0f} → {run.peak_rss / MiB:.0f} MiB; requests "
            f"{_verbs(run.verbs)}; writes {_verbs(run.writes)}",
            file=sys.stderr,
        )
        rows.append((n, base, run))
    if not rows:
        return 0
    text = report(args, rows, machine_line)
    print(text)
    if args.write:
        report_file.add_to_section(args.write, SECTION, text)
    return 0


SECTION = "bench/reconcile — the operator against parallel server-side apply"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--streams", type=int, default=8, help="concurrent apply streams")
    parser.add_argument(
        "--client",
        choices=["python", "kubectl"],
        default="python",
        help="the baseline's streams: kubernetes_asyncio coroutines or kubectl processes",
    )
    parser.add_argument("--workers", type=int, default=32, help="the operator's workers")
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=None,
        help="the operator's resync period (default 300, or 60 with --steady-minutes)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="time the operator only")
    parser.add_argument("--baseline-only", action="store_true", help="time the baseline only")
    parser.add_argument(
        "--steady-minutes",
        type=float,
        default=0.0,
        help="after all Ready, leave the Agents alone this long and watch",
    )
    parser.add_argument(
        "--fresh-bed",
        type=int,
        metavar="NODES",
        default=0,
        help="start a test bed with NODES kwok nodes for every timed part, stop it after",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    parser.add_argument(
        "--tracemalloc-dir",
        type=Path,
        help="after all Ready, restart the operator under tracemalloc; its snapshot goes here",
    )
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    if args.resync_seconds is None:
        args.resync_seconds = 60.0 if args.steady_minutes else 300.0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
