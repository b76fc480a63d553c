"""Benchmark: the operator's autoscaler on the test bed, four figures in one run.

1. **Reaction**: seconds from a new queue depth visible in Prometheus (the first
   instant query that returns it) to the Agent's Deployment holding the replica count
   it asks for. Target: at most pollingIntervalSeconds + 1 s.
2. **Noise**: scale events under a queue depth that jumps around a level every second,
   against the changes the stabilization windows allow. The allowed count replays the
   HPA rule (proposal with tolerance; up to the lowest proposal of the scale-up window,
   down to the highest of the scale-down window) over the same depth, read back from
   Prometheus second by second from the Agent's creation on: the most changes any
   controller evaluating as often as every second could make under those windows.
   Target: none beyond. The changes of the raw proposals (no windows) are shown for
   contrast.
3. **Wake-up from zero**: a task submitted to an Agent at zero replicas, to its answer.
   Real `bmad runtime` processes follow the Deployment (`bmad_testbed.runtimes`); at zero
   the autoscaler reads the task stream from the Agent's Redis.
4. **Predictive vs reactive** on a ramp: two Agents fed the same rising queue depth, one
   with ``predictive.enabled``; replica-seconds spent under-provisioned (the replicas the
   depth needs, ceil(depth / target), minus the Deployment's ready replicas, summed over
   time while positive).

Depths for 1, 2 and 4 are pushed through the Pushgateway with an Agent's namespace and
agent labels, as its runtime would export them; 3 uses real runtime processes.

Run on demand (not in CI) on a test bed with no operator of its own running (this
starts one, with the test bed's Prometheus):

    set -a; eval "$(.venv/bin/bmad testbed up)"; set +a
    .venv/bin/python bench/autoscale.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import functools
import json
import math
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bmad_integrations import taskbus
from bmad_operator import kube
from bmad_operator.autoscaling import reasons
from bmad_testbed import operator_proc
from bmad_testbed.kubectl import Kubectl
from bmad_testbed.runtimes import ReplicaMirror

REPO = Path(__file__).resolve().parent.parent
Obj = dict[str, Any]
TARGET = 5
SCALE_REASONS = {
    reasons.ABOVE_TARGET,
    reasons.BELOW_TARGET,
    reasons.PREDICTED_SCALE_UP,
    reasons.SCALE_UP_STABILIZED,
    reasons.SCALE_DOWN_STABILIZED,
    reasons.SCALED_TO_ZERO,
    reasons.ACTIVATED,
    reasons.BELOW_MIN_REPLICAS,
    reasons.ABOVE_MAX_REPLICAS,
    reasons.TOO_MANY_REPLICAS,
    reasons.TOO_FEW_REPLICAS,
    reasons.TENANT_LIMIT,
    reasons.SCALE_UP_LIMIT,
    reasons.SCALE_DOWN_LIMIT,
}


class Bed:
    """The test bed as the benchmark uses it: kubectl, the API, Prometheus, Pushgateway."""

    def __init__(self, api: kube.Kube, kubectl: Kubectl, namespace: str, env: dict[str, str]):
        self.api = api
        self.kubectl = kubectl
        self.k = kubectl.in_namespace(namespace)
        self.namespace = namespace
        self.env = env
        self.http = httpx.AsyncClient(timeout=10)
        self.groups: list[str] = []

    async def push(self, agent: str, depth: float) -> None:
        group = (
            f"{self.env['BMAD_PUSHGATEWAY_URL']}/metrics/job/bench-autoscale"
            f"/namespace/{self.namespace}/agent/{agent}"
        )
        body = f"# TYPE bmad_agent_queue_depth gauge\nbmad_agent_queue_depth {depth}\n"
        (await self.http.put(group, content=body.encode())).raise_for_status()
        if group not in self.groups:
            self.groups.append(group)

    def depth_query(self, agent: str) -> str:
        return (
            "max by (namespace, agent) (bmad_agent_queue_depth"
            f'{{namespace="{self.namespace}",agent="{agent}"}})'
        )

    async def visible(self, agent: str) -> float | None:
        url = f"{self.env['BMAD_PROMETHEUS_URL']}/api/v1/query"
        data = (await self.http.get(url, params={"query": self.depth_query(agent)})).json()
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    async def history(self, agent: str, start: float, end: float) -> list[tuple[float, float]]:
        url = f"{self.env['BMAD_PROMETHEUS_URL']}/api/v1/query_range"
        params: dict[str, str | float] = {
            "query": self.depth_query(agent), "start": start, "end": end, "step": 1,
        }  # fmt: skip
        data = (await self.http.get(url, params=params)).json()
        result = data["data"]["result"]
        return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []

    async def deployment(self, agent: str) -> Obj:
        found = await self.api.get("Deployment", self.namespace, agent)
        return found or {}

    def scale_events(self, agent: str) -> list[str]:
        items = self.k.json(
            "get",
            "events",
            "--field-selector",
            f"involvedObject.kind=Agent,involvedObject.name={agent}",
        )["items"]
        return [e["message"] for e in items if e["reason"] in SCALE_REASONS]

    async def close(self) -> None:
        for group in self.groups:
            await self.http.delete(group)
        await self.http.aclose()


def agent_doc(name: str, autoscaling: Obj, **spec: Any) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "role": "dev",
            "model": {"provider": "echo", "name": "echo-1"},
            "memory": {"store": "inProcess"},
            "replicas": 1,
            "autoscaling": {"enabled": True, **autoscaling},
            **spec,
        },
    }


def fast_rules(up_window: int = 0, down_window: int = 0) -> Obj:
    """Rates that never hold a step back: what is measured is reaction and windows."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": up_window,
            "policies": [{"type": "Pods", "value": 100, "periodSeconds": 1}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": down_window,
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}],
        },
    }


async def until(check: Callable[[], Awaitable[Any]], *, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what}: not within {within:.0f} s")


async def replicas_at(bed: Bed, agent: str, wanted: int) -> bool:
    return int((await bed.deployment(agent)).get("spec", {}).get("replicas", -1)) == wanted


# --- 1. reaction -----------------------------------------------------------------------


async def reaction(bed: Bed, *, interval: int, steps: int) -> list[float]:
    name = "react"
    bed.k.apply(
        agent_doc(
            name, {"maxReplicas": 20, "pollingIntervalSeconds": interval, "behavior": fast_rules()}
        )
    )
    await bed.push(name, TARGET)
    await until(lambda: replicas_at(bed, name, 1), within=120, what="react at 1")
    depths = [50, 10, 35, 5]
    latencies = []
    for i in range(steps):
        depth = depths[i % len(depths)]
        wanted = math.ceil(depth / TARGET)
        await bed.push(name, depth)

        async def seen(depth: float = depth) -> bool:
            return await bed.visible(name) == depth

        await until(seen, within=30, what=f"depth {depth} in Prometheus")
        shown = time.monotonic()
        await until(
            functools.partial(replicas_at, bed, name, wanted),
            within=60,
            what=f"the Deployment at {wanted}",
        )
        latencies.append(time.monotonic() - shown)
        print(f"reaction {i}: depth {depth} -> {wanted}: {latencies[-1]:.2f} s", file=sys.stderr)
    return latencies


# --- 2. noise --------------------------------------------------------------------------


def propose(value: float, current: int, tolerance: float = 0.1) -> int:
    """The HPA's per-metric proposal for a per-replica target, with its tolerance band."""
    if current > 0 and abs(value / (TARGET * current) - 1) <= tolerance:
        return current
    return max(math.ceil(value / TARGET - 1e-9), 0)


def allowed_changes(
    values: Sequence[float], *, up_window: int, down_window: int, low: int, high: int
) -> tuple[int, int]:
    """(changes the windows allow, changes of the raw proposals), one value per second."""
    current, raw_current = 1, 1
    recent: list[tuple[int, int]] = []  # (second, proposal)
    changes = raw_changes = 0
    for second, value in enumerate(values):
        raw = propose(value, current)
        recent.append((second, raw))
        up = min(p for s, p in recent if s > second - max(up_window, 1))
        down = max(p for s, p in recent if s > second - max(down_window, 1))
        new = min(max(min(max(current, up), down), low), high)
        if new != current:
            changes += 1
            current = new
        bare = min(max(propose(value, raw_current), low), high)
        if bare != raw_current:
            raw_changes += 1
            raw_current = bare
    return changes, raw_changes


async def noise(
    bed: Bed, *, interval: int, seconds: int, up_window: int, down_window: int
) -> tuple[int, int, int]:
    name = "noisy"
    # The replay starts where the operator's history does, at the Agent's creation: the
    # proposals of the quiet level before the noise are in the windows too.
    applied = time.time()
    bed.k.apply(
        agent_doc(
            name,
            {
                "maxReplicas": 20,
                "pollingIntervalSeconds": interval,
                "behavior": fast_rules(up_window, down_window),
            },
        )
    )
    await bed.push(name, TARGET)
    await until(lambda: replicas_at(bed, name, 1), within=120, what="noisy at 1")
    rng = random.Random(7)
    for _ in range(seconds):
        await bed.push(name, 30 + rng.uniform(-12, 12))
        await asyncio.sleep(1)
    await asyncio.sleep(interval + 2)  # the operator's evaluation of the last second
    counted = time.time()
    scales = bed.scale_events(name)
    print("noise: scale events:", *scales, sep="\n  ", file=sys.stderr)
    events = len(scales)
    values = [v for _, v in await bed.history(name, applied, counted)]
    allowed, raw = allowed_changes(
        values, up_window=up_window, down_window=down_window, low=1, high=20
    )
    return events, allowed, raw


# --- 3. wake-up from zero --------------------------------------------------------------


def secret_doc(name: str, data: dict[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


async def wake_up(
    bed: Bed, *, interval: int, cycles: int, tmp: Path
) -> tuple[list[float], list[float]]:
    """(task submitted → answered, task submitted → the Deployment at ≥ 1), per cycle."""
    name = "sleepy"
    env = bed.env
    bed.k.apply(secret_doc("redis-creds", {"password": env["BMAD_REDIS_PASSWORD"]}))
    bed.k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "redis"},
            "spec": {
                "type": "redis",
                "secretRef": {"name": "redis-creds"},
                "redis": {"host": "127.0.0.1", "port": int(env["BMAD_REDIS_PORT"])},
            },
        }
    )
    bed.k.apply(
        agent_doc(
            name,
            {
                "minReplicas": 0,
                "maxReplicas": 3,
                "idleSeconds": 5,
                "pollingIntervalSeconds": interval,
            },
            integrations=["redis"],
        )
    )
    bed.k.run("wait", "--for=condition=Ready", f"agent/{name}", "--timeout=180s", timeout=190)
    producer = taskbus.TaskProducer.from_url(
        env["BMAD_REDIS_URL"], tenant=bed.namespace, agent=name
    )
    times: list[float] = []
    scaled: list[float] = []
    try:
        async with ReplicaMirror(
            bed.api,
            bed.namespace,
            name,
            workdir=tmp,
            targets_dir=Path(env["BMAD_PROMETHEUS_TARGETS_DIR"]),
        ) as mirror:
            for cycle in range(cycles):

                async def asleep() -> bool:
                    return await replicas_at(bed, name, 0) and mirror.running == 0

                await until(asleep, within=180, what="the agent at zero")
                sent = time.monotonic()
                await producer.submit(f"wake-{cycle}", {"input": f"wake up {cycle}"})

                async def awake(sent: float = sent) -> float:
                    async def up() -> bool:
                        spec = (await bed.deployment(name)).get("spec", {})
                        return int(spec.get("replicas", 0)) >= 1

                    await until(up, within=180, what="the Deployment at 1")
                    return time.monotonic() - sent

                watch = asyncio.create_task(awake())
                result = await producer.wait_result(f"wake-{cycle}", timeout_s=180, poll_s=0.05)
                if result is None or result.status != "succeeded":
                    raise RuntimeError(f"wake-{cycle} was not answered: {result}")
                times.append(time.monotonic() - sent)
                scaled.append(await asyncio.wait_for(watch, timeout=10))
                print(
                    f"wake-up {cycle}: answered {times[-1]:.2f} s, "
                    f"Deployment at 1 after {scaled[-1]:.2f} s",
                    file=sys.stderr,
                )
    finally:
        await producer.aclose()
    return times, scaled


# --- 4. predictive vs reactive -----------------------------------------------------------


async def ramp(bed: Bed, *, interval: int, seconds: int, top: float, lead: int) -> dict[str, float]:
    agents = {
        "ramp-reactive": None,
        "ramp-predictive": {"enabled": True, "lookbackSeconds": 60, "leadSeconds": lead},
    }
    for name, predictive in agents.items():
        autoscaling: Obj = {
            "maxReplicas": 40,
            "pollingIntervalSeconds": interval,
            "behavior": fast_rules(down_window=600),
        }
        if predictive:
            autoscaling["predictive"] = predictive
        bed.k.apply(agent_doc(name, autoscaling))
        await bed.push(name, 1)
    for name in agents:
        await until(functools.partial(replicas_at, bed, name, 1), within=120, what=f"{name} at 1")
    # A flat minute first: the forecaster's lookback starts from a known level.
    for _ in range(60):
        for name in agents:
            await bed.push(name, 1)
        await asyncio.sleep(1)
    under = dict.fromkeys(agents, 0.0)
    began = time.monotonic()
    last = began
    while (now := time.monotonic()) - began < seconds + 30:
        elapsed = now - began
        depth = max(1.0, top * min(elapsed, seconds) / seconds)
        needed = math.ceil(depth / TARGET)
        for name in agents:
            await bed.push(name, depth)
            ready = int((await bed.deployment(name)).get("status", {}).get("readyReplicas") or 0)
            under[name] += max(0, needed - ready) * (now - last)
        last = now
        await asyncio.sleep(0.5)
    return under


# --- the run ---------------------------------------------------------------------------


async def run(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    kubectl = Kubectl(env.get("BMAD_KUBECTL", "kubectl"), env["KUBECONFIG"])
    for path in sorted((REPO / "crds" / "bases").glob("bmad.dev_*.yaml")):
        kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(path))
    namespace = f"bench-autoscale-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", namespace)
    op = operator_proc.OperatorProcess(
        kubeconfig=env["KUBECONFIG"],
        log_path=tmp / "operator.log",
        resync_seconds=60,
        prometheus_url=env["BMAD_PROMETHEUS_URL"],
    )
    op.start()
    api = await kube.Kube.connect()
    bed = Bed(api, kubectl, namespace, env)
    out: dict[str, Any] = {}
    try:
        if "reaction" in args.parts:
            out["reaction"] = await reaction(bed, interval=args.interval, steps=args.steps)
        if "noise" in args.parts:
            out["noise"] = await noise(
                bed,
                interval=args.interval,
                seconds=args.noise_seconds,
                up_window=args.up_window,
                down_window=args.down_window,
            )
        if "wake" in args.parts:
            out["wake"] = await wake_up(bed, interval=args.interval, cycles=args.cycles, tmp=tmp)
        if "ramp" in args.parts:
            out["ramp"] = await ramp(
                bed,
                interval=args.interval,
                seconds=args.ramp_seconds,
                top=args.ramp_top,
                lead=args.lead,
            )
    finally:
        await bed.close()
        await api.close()
        op.stop()
        kubectl.run("delete", "namespace", namespace, "--wait=false", check=False)
    return out


def report(args: argparse.Namespace, out: dict[str, Any]) -> str:
    lines = [
        f"\n### bench/autoscale — {dt.date.today().isoformat()}\n",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; the test bed (control plane with kwok nodes, "
        "Prometheus scraping every 1 s, Pushgateway, Redis) and the operator on the same "
        f"machine; pollingIntervalSeconds {args.interval}.\n",
        "| figure | result | target |",
        "|---|---|---|",
    ]
    if "reaction" in out:
        r = out["reaction"]
        lines.append(
            f"| reaction: depth visible in Prometheus → Deployment replicas patched "
            f"({len(r)} steps) | p50 {statistics.median(r):.1f} s, max {max(r):.1f} s | "
            f"≤ {args.interval + 1} s |"
        )
    if "noise" in out:
        events, allowed, raw = out["noise"]
        lines.append(
            f"| noise: scale events in {args.noise_seconds} s of a depth jumping 18 to 42 every "
            f"second (windows up {args.up_window} s, down {args.down_window} s) | {events} "
            f"(the windows allow {allowed}; raw proposals change {raw} times) | ≤ {allowed} |"
        )
    if "wake" in out:
        w, d = out["wake"]
        lines.append(
            f"| wake-up from zero: task submitted → answered ({len(w)} times, real runtime "
            f"processes) | p50 {statistics.median(w):.1f} s, max {max(w):.1f} s | — |"
        )
        lines.append(
            f"| of which: task submitted → the Deployment at 1 replica (the operator's "
            f"part) | p50 {statistics.median(d):.1f} s, max {max(d):.1f} s | "
            f"≤ {args.interval + 1} s |"
        )
    if "ramp" in out:
        under = out["ramp"]
        reactive, predictive = under["ramp-reactive"], under["ramp-predictive"]
        lines.append(
            f"| ramp 1 → {args.ramp_top:g} tasks in {args.ramp_seconds} s (target 5): "
            f"under-provisioned replica-seconds | reactive {reactive:.0f}, predictive "
            f"(lead {args.lead} s) {predictive:.0f} | predictive < reactive |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interval", type=int, default=5, help="pollingIntervalSeconds")
    parser.add_argument("--steps", type=int, default=8, help="reaction: depth changes")
    parser.add_argument("--noise-seconds", type=int, default=180)
    parser.add_argument("--up-window", type=int, default=30)
    parser.add_argument("--down-window", type=int, default=60)
    parser.add_argument("--cycles", type=int, default=3, help="wake-ups from zero")
    parser.add_argument("--ramp-seconds", type=int, default=120)
    parser.add_argument("--ramp-top", type=float, default=100)
    parser.add_argument("--lead", type=int, default=20, help="predictive leadSeconds")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["reaction", "noise", "wake", "ramp"],
        choices=["reaction", "noise", "wake", "ramp"],
    )
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    env = dict(os.environ)
    missing = [
        v
        for v in (
            "KUBECONFIG",
            "BMAD_PROMETHEUS_URL",
            "BMAD_PUSHGATEWAY_URL",
            "BMAD_REDIS_URL",
            "BMAD_PROMETHEUS_TARGETS_DIR",
        )
        if not env.get(v)
    ]
    if missing:
        parser.error(f"set {', '.join(missing)} (bmad testbed up prints them)")
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp:
        out = asyncio.run(run(args, env, Path(tmp)))
    text = report(args, out)
    print(text)
    print(json.dumps(out), file=sys.stderr)
    if args.write:
        with args.write.open("a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
