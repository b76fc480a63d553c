"""A test aid: the runtime's task-bus consumer as its own process, with deterministic
handlers instead of a model.

``python tests/integration/runtime/bus_worker.py --redis-url URL --tenant T --agent A
--consumer NAME`` consumes the agent's stream with `bmad_runtime.bus.consumer` until
SIGTERM (or SIGINT), then shuts down gracefully: no new reads, in-flight tasks get
``--grace-s`` to finish, the rest stay pending for the other consumers. It is what
test_bus_workers.py starts, kills and restarts. It lives with the tests, not in the
runtime package: nothing in production runs it.

Handlers:

``echo``
    ``{"output": <payload "input" upper-cased>, "consumer": NAME, "run": N}``, where
    N counts the task's executions (INCR of ``bmad:T:A:runs:<task id>``, done before
    the optional ``--task-delay-ms`` sleep) so a test can see that a task ran twice
    while its result was written once.
``fail``
    counts the run the same way, then raises: every attempt fails.

The Redis URL may carry a password; it is read from ``--redis-url`` or, better (the
command line is visible to other users of the machine), from ``BMAD_REDIS_URL``, and
it is never logged. On exit the consumer's counters are printed to stdout as one
JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from redis import asyncio as aioredis

from bmad_integrations import taskwire
from bmad_runtime.bus import client as bus_client
from bmad_runtime.bus import consumer as bus_consumer

log = logging.getLogger("bus_worker")

HANDLERS = ("echo", "fail")
URL_ENV = "BMAD_REDIS_URL"


class DeliberateError(RuntimeError):
    """What the `fail` handler raises, every time."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bus_worker.py", description="Consume an agent's task bus."
    )
    parser.add_argument("--redis-url", default=os.environ.get(URL_ENV), help=f"or ${URL_ENV}")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--consumer", required=True, help="this consumer's name in the group")
    parser.add_argument("--handler", choices=HANDLERS, default="echo")
    parser.add_argument("--task-delay-ms", type=int, default=0)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--block-ms", type=int, default=1000)
    parser.add_argument("--min-idle-ms", type=int, default=bus_client.BusConfig.min_idle_ms)
    parser.add_argument("--max-attempts", type=int, default=bus_client.BusConfig.max_attempts)
    parser.add_argument("--grace-s", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error(f"--redis-url or ${URL_ENV} is required")
    if args.task_delay_ms < 0:
        parser.error("--task-delay-ms must not be negative")
    return args


def runs_key(keys: taskwire.Keys, task_id: str) -> str:
    """Where the handlers count a task's executions."""
    return f"{keys.prefix}:runs:{taskwire.validate_task_id(task_id)}"


def make_handler(
    name: str,
    *,
    redis: aioredis.Redis,
    keys: taskwire.Keys,
    consumer: str,
    delay_ms: int = 0,
    runs_ttl_s: int = 86_400,
) -> bus_consumer.Handler:
    """The deterministic handler called `name` (see the module docstring)."""
    if name not in HANDLERS:
        raise ValueError(f"unknown handler {name!r}; choose one of {', '.join(HANDLERS)}")

    async def count_run(task: taskwire.Task) -> int:
        key = runs_key(keys, task.task_id)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, runs_ttl_s)
            run, _ = await pipe.execute()
        return int(run)

    async def echo(task: taskwire.Task) -> dict[str, Any]:
        run = await count_run(task)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        text = task.payload.get("input", "")
        return {"output": str(text).upper(), "consumer": consumer, "run": run}

    async def fail(task: taskwire.Task) -> dict[str, Any]:
        run = await count_run(task)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        raise DeliberateError(f"task {task.task_id} fails on purpose (run {run})")

    return echo if name == "echo" else fail


async def run(args: argparse.Namespace, *, stop: asyncio.Event | None = None) -> dict[str, int]:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    config = bus_client.BusConfig(min_idle_ms=args.min_idle_ms, max_attempts=args.max_attempts)
    bus = bus_client.TaskBus.from_url(
        args.redis_url, tenant=args.tenant, agent=args.agent, config=config
    )
    try:
        handler = make_handler(
            args.handler,
            redis=bus.redis,
            keys=bus.keys,
            consumer=args.consumer,
            delay_ms=args.task_delay_ms,
        )
        stats = await bus_consumer.consume(
            bus,
            handler,
            consumer_name=args.consumer,
            batch=args.batch,
            block_ms=args.block_ms,
            concurrency=args.concurrency,
            stop=stop,
            grace_s=args.grace_s,
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await bus.aclose()
    return stats.as_dict()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        stats = asyncio.run(run(args))
    except ValueError as exc:  # a bad tenant, agent or consumer name
        log.error("%s", exc)
        return 2
    print(json.dumps({"consumer": args.consumer, **stats}, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
