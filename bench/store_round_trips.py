"""Count the round trips one turn's record costs the durable store, per datastore.

A turn leaves its user and assistant turns, a usage record and an audit entry
(`ports.TurnRecord`). This writes N of them into a fresh database of the test bed's
PostgreSQL and its Redis, once one part at a time (`append` twice, `record_usage`,
`audit`: how the runtime wrote them before issue 15) and once with `record_turn`, and
counts the messages the client sends to each server (every `write` on the socket's
transport: asyncpg and redis-py send a whole request, and then wait for its answer,
in one), divided by N. A statement of the pool's own (asyncpg's default reset of a
connection that goes back to the pool, which the store's pool no longer sends) would
be counted too: it is a round trip like any other.

    set -a; eval "$(.venv/bin/bmad testbed up --no-cluster --services postgres,redis)"; set +a
    .venv/bin/python bench/store_round_trips.py --records 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import os
import secrets
import sys
import urllib.parse
from asyncio import selector_events
from collections.abc import Awaitable, Callable
from typing import Any

from bmad_runtime import ports
from bmad_runtime.memory import store as memory_store
from bmad_testbed import databases


def record(tenant: str, conversation: str, n: int) -> ports.TurnRecord:
    now = dt.datetime.now(dt.UTC)
    return ports.TurnRecord(
        tenant=tenant,
        agent="bench",
        subject="anonymous",
        turns=(
            ports.Turn(conversation, "user", f"question {n}", now),
            ports.Turn(conversation, "assistant", f"answer {n}", now, model="echo-1"),
        ),
        usage=ports.UsageRecord(
            tenant=tenant,
            agent="bench",
            conversation_id=conversation,
            model="echo-1",
            provider="echo",
            tokens_in=8,
            tokens_out=5,
            latency_ms=1,
        ),
        action="agent.invoke",
        detail={"conversationId": conversation, "n": n},
    )


async def one_by_one(store: memory_store.PostgresRedisStore, rec: ports.TurnRecord) -> None:
    for turn in rec.turns:
        await store.append(turn, tenant=rec.tenant, agent=rec.agent, subject=rec.subject)
    await store.record_usage(rec.usage)
    await store.audit(
        tenant=rec.tenant,
        agent=rec.agent,
        subject=rec.subject,
        action=rec.action,
        detail=rec.detail,
    )


async def measure(postgres_url: str, redis_url: str, records: int) -> dict[str, dict[str, float]]:
    ports_of = {
        urllib.parse.urlsplit(postgres_url).port: "postgres",
        urllib.parse.urlsplit(redis_url).port: "redis",
    }
    sent: collections.Counter[str] = collections.Counter()
    # asyncio's socket transport, which both clients write through (not public API).
    transport: Any = vars(selector_events)["_SelectorSocketTransport"]
    original = transport.write

    def counting(self: Any, data: Any) -> None:
        peer = self.get_extra_info("peername")
        sent[ports_of.get(peer[1] if peer else None, "other")] += 1
        original(self, data)

    results: dict[str, dict[str, float]] = {}
    async with databases.temporary(postgres_url, "bench_rt") as dsn:
        store = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=redis_url)
        tenant = f"bench-{secrets.token_hex(4)}"
        ways: dict[str, Callable[[Any, ports.TurnRecord], Awaitable[None]]] = {
            "one by one": one_by_one,
            "record_turn": memory_store.PostgresRedisStore.record_turn,
        }
        try:
            for name, write in ways.items():
                # Warm up: the statements prepared, the scripts loaded, the pool filled.
                for n in range(5):
                    await write(store, record(tenant, f"warm-{name}", n))
                transport.write = counting
                sent.clear()
                try:
                    for n in range(records):
                        await write(store, record(tenant, f"{name}-{n}", n))
                finally:
                    transport.write = original
                results[name] = {k: v / records for k, v in sorted(sent.items())}
        finally:
            await store.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200)
    args = parser.parse_args()
    postgres_url, redis_url = os.environ.get("BMAD_POSTGRES_URL"), os.environ.get("BMAD_REDIS_URL")
    if not postgres_url or not redis_url:
        print(
            "needs the test bed's PostgreSQL and Redis: set -a; eval "
            '"$(.venv/bin/bmad testbed up --no-cluster --services postgres,redis)"; set +a',
            file=sys.stderr,
        )
        return 2
    results = asyncio.run(measure(postgres_url, redis_url, args.records))
    print("| how a turn's record is written | PostgreSQL round trips | Redis round trips |")
    print("|---|---:|---:|")
    for name, sent in results.items():
        print(f"| {name} | {sent.get('postgres', 0):.2f} | {sent.get('redis', 0):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
