"""Benchmark: tasks through an agent's bus → tasks/s and submit-to-result latency.

N tasks are submitted with the shared producer (`bmad_integrations.taskbus`) and run by
C consumers of the runtime (`bmad_runtime.bus.consumer`, in this process) whose handler
only echoes: what is measured is the bus itself (the submit script, XREADGROUP, the
finish script, polling for the result), not a model, with a bounded number of tasks in
flight. This is where the speed figure of the 1,000-task worker test lives now (tests
assert outcomes, not speed).

Run on demand (not in CI), with the test bed's Redis:

    set -a; eval "$(.venv/bin/bmad testbed up --no-cluster --services redis)"; set +a
    .venv/bin/python bench/bus.py --tasks 1000 --consumers 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from redis import asyncio as aioredis

from bmad_integrations import taskbus, taskwire
from bmad_runtime.bus import client, consumer


async def run(url: str, *, tasks: int, consumers: int, inflight: int) -> tuple[float, list[float]]:
    """Seconds for all tasks, and each task's submit-to-result latency (seconds)."""
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    tenant, agent = f"bench-{secrets.token_hex(3)}", "bus"
    bus = client.TaskBus(redis, tenant=tenant, agent=agent)
    producer = taskbus.TaskProducer(redis, tenant=tenant, agent=agent)
    window = asyncio.Semaphore(inflight)
    stop = asyncio.Event()

    async def echo(task: taskwire.Task) -> dict[str, Any]:
        return {"output": task.payload.get("input", "")}

    running = [
        asyncio.create_task(consumer.consume(bus, echo, consumer_name=f"c{i}", stop=stop))
        for i in range(consumers)
    ]
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with window:
            sent = time.perf_counter()
            await producer.submit(f"t-{i}", {"input": f"task {i}"})
            await producer.wait_result(f"t-{i}", timeout_s=120, poll_s=0.005)
            latencies.append(time.perf_counter() - sent)

    try:
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        elapsed = time.perf_counter() - began
    finally:
        stop.set()
        await asyncio.gather(*running)
        keys = [k async for k in redis.scan_iter(match=f"{bus.keys.prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])
        await redis.aclose()
    return elapsed, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=50, help="tasks awaited at once")
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    url = os.environ.get("BMAD_REDIS_URL")
    if not url:
        parser.error("set BMAD_REDIS_URL (bmad testbed up prints it)")
    elapsed, latencies = asyncio.run(
        run(url, tasks=args.tasks, consumers=args.consumers, inflight=args.inflight)
    )
    cut = statistics.quantiles(latencies, n=100)
    row = (
        f"| {args.tasks} | {args.consumers} | {elapsed:.1f} | {args.tasks / elapsed:.0f} | "
        f"{statistics.median(latencies) * 1000:.0f} / {cut[98] * 1000:.0f} |"
    )
    text = "\n".join(
        [
            f"\n### bench/bus — {dt.date.today().isoformat()}\n",
            f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}; the test bed's Redis on the same machine; "
            "consumers in the benchmark's process, an echo handler; the producer keeps "
            f"{args.inflight} tasks in flight.\n",
            "| tasks | consumers | seconds | tasks/s | submit→result p50 / p99 (ms) |",
            "|---:|---:|---:|---:|---:|",
            row,
        ]
    )
    print(text)
    if args.write:
        with args.write.open("a") as fh:
            fh.write(text + "\n")
    print(f"{args.tasks} tasks in {elapsed:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
