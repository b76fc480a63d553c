"""A small process for the usage crash tests: a task worker that writes usage records
the way an agent replica does, or the operator's ingester.

    python usage_proc.py worker --tasks-url URL --tasks-key KEY --group G --consumer C
        --ledger-url URL --username U --password-env VAR --namespace NS --agent A
        [--pause-after N --marker KEY]
    python usage_proc.py ingester --redis-url URL --dsn DSN --consumer C [--match PATTERN]

A worker takes tasks from a Redis stream through a consumer group (at least once, like
the task bus: entries of a dead worker are claimed by the others after 1 s), "calls the
model" (a short sleep), writes the call's usage record with the id derived from the
task id, then acknowledges the task. With ``--pause-after N`` it stops after writing
its N-th record and before acknowledging it, sets ``--marker`` in Redis, and waits to
be killed: the replay of that task by another worker is then certain.
Secrets come from the environment (the name of the variable is an argument).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import sys

from redis import asyncio as aioredis

from bmad_integrations.usage import ingester, record, store, writer

IDLE_MS = 1000


async def work(args: argparse.Namespace) -> int:
    tasks = aioredis.Redis.from_url(args.tasks_url, decode_responses=True)
    ledger = writer.LedgerWriter.from_url(
        args.ledger_url,
        username=args.username,
        password=os.environ[args.password_env],
        namespace=args.namespace,
        agent=args.agent,
    )
    written = 0
    try:
        while True:
            claimed = await tasks.xautoclaim(
                args.tasks_key, args.group, args.consumer, min_idle_time=IDLE_MS, count=5
            )
            entries = list(claimed[1])
            if not entries:
                read = await tasks.xreadgroup(
                    args.group, args.consumer, {args.tasks_key: ">"}, count=5
                )
                entries = list(read[0][1]) if read else []
            if not entries:
                pending = await tasks.xpending(args.tasks_key, args.group)
                if not pending["pending"]:
                    return 0
                await asyncio.sleep(0.2)  # others' tasks may come back to us
                continue
            for entry_id, fields in entries:
                if fields is None:
                    await tasks.xack(args.tasks_key, args.group, entry_id)
                    continue
                await asyncio.sleep(random.uniform(0, 0.003))  # the model call
                record_id = record.task_record_id(fields["task_id"])
                # As the runtime writes a record (`bmad_runtime.ledger.PlatformLedger`).
                await ledger.append(
                    tenant=args.namespace,
                    record_id=record_id,
                    provider="echo",
                    model="echo",
                    tokens_in=int(fields["in"]),
                    tokens_out=int(fields["out"]),
                    occurred_at=dt.datetime.now(dt.UTC),
                    source="task",
                    conversation=None,
                )
                written += 1
                await tasks.rpush(f"{args.tasks_key}:written", record_id)  # for the test
                if args.pause_after and written == args.pause_after:
                    await tasks.set(args.marker, record_id)
                    await asyncio.sleep(3600)  # killed here: written, not acknowledged
                async with tasks.pipeline(transaction=True) as pipe:
                    pipe.xack(args.tasks_key, args.group, entry_id)
                    pipe.xdel(args.tasks_key, entry_id)
                    await pipe.execute()
    finally:
        await ledger.aclose()
        await tasks.aclose()


async def ingest(args: argparse.Namespace) -> int:
    redis = aioredis.Redis.from_url(args.redis_url, decode_responses=True)
    ledger = await store.LedgerStore.connect(args.dsn)
    job = ingester.Ingester(
        redis,
        ledger,
        consumer=args.consumer,
        min_idle_ms=IDLE_MS,
        claim_every=0.5,
        discover_every=0.5,
        count=50,
        match=args.match,
    )
    try:
        await job.run(asyncio.Event(), interval=0.1)
    finally:
        await ledger.close()
        await redis.aclose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    for name in ("tasks-url", "tasks-key", "group", "consumer", "ledger-url", "username"):
        w.add_argument(f"--{name}", required=True)
    for name in ("password-env", "namespace", "agent"):
        w.add_argument(f"--{name}", required=True)
    w.add_argument("--pause-after", type=int, default=0)
    w.add_argument("--marker", default="")
    i = sub.add_parser("ingester")
    for name in ("redis-url", "dsn", "consumer"):
        i.add_argument(f"--{name}", required=True)
    i.add_argument("--match", default=record.STREAM_PREFIX + ":*")
    args = parser.parse_args()
    return asyncio.run(work(args) if args.mode == "worker" else ingest(args))


if __name__ == "__main__":
    sys.exit(main())
