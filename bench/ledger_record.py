"""What one usage record costs the runtime's CPU, apart from the server and the network.

The runtime's ledger (`bmad_runtime.ledger.PlatformLedger`) turns each model call into
an XADD on the agent's stream (`usage.writer.LedgerWriter.append`), puts it on the
wire and awaits Redis's reply before the answer may leave. This times that path in one
process, over the ledger's own protocol (`usage.resp`) with a transport that keeps
what it is given and a reply fed straight back: the record, its checks, the command,
the send, the reply's parser and the awaits, with no socket and no event loop turn. For
comparison it times the same record sent the way the runtime sent it before 2026-12-01
afternoon (what `LedgerWriter.write` did then): a `usage.record.UsageRecord` and its
checks, a map of its fields (`record.encode`), the command packed by `resp.pack`
through `resp.Client.execute_command`, awaited through the writer's retrying coroutine.

With the test bed's Redis (``BMAD_REDIS_URL``) it also times lone round trips, one XADD
at a time and awaited, as a request at concurrency 1 makes them: the part of the
ledger's cost that is the machine's (two processes woken in turn over loopback TCP),
not the code's.

    set -a; eval "$(.venv/bin/bmad testbed up --no-cluster --services redis)"; set +a
    .venv/bin/python bench/ledger_record.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import itertools
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bmad_integrations.usage import record, resp, writer
from bmad_runtime import ledger, ports

REPLY = b"$15\r\n1764590400000-0\r\n"


class _Transport:
    """What the protocol needs of a transport; every write is dropped."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


def _entry() -> ports.LedgerEntry:
    return ports.LedgerEntry(
        record_id=record.request_record_id(f"bench-1.{os.urandom(16).hex()}"),
        source="http",
        provider="echo",
        model="echo-1",
        tokens_in=12,
        tokens_out=34,
        conversation_id="c_0123456789abcdef0123",
        occurred_at=dt.datetime.now(dt.UTC),
    )


def _drive(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine whose awaits are all done already (the reply was fed)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("the write waited: its reply was not in")


def _per_call(call: Callable[[], None], calls: int) -> float:
    """Microseconds a call, the median of five timings of ``calls`` calls."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(runs)


async def in_process(calls: int) -> tuple[float, float]:
    """Microseconds a record with its reply: the runtime's path, then `write`'s."""
    protocol = resp._Protocol(timeout=2.0)
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    client = resp.Client("127.0.0.1", 1)
    client._protocol = protocol
    ledger_writer = writer.LedgerWriter(client, namespace="bench", agent="bench-agent")
    platform = ledger.PlatformLedger(ledger_writer, tenant="bench")
    entry = _entry()

    def runtime_path() -> None:
        sent = platform.write(entry)
        protocol.data_received(REPLY)
        _drive(sent)

    def record_path() -> None:
        rec = record.UsageRecord(
            record_id=entry.record_id,
            tenant="bench",
            namespace="bench",
            agent="bench-agent",
            provider=entry.provider,
            model=entry.model,
            tokens_in=entry.tokens_in,
            tokens_out=entry.tokens_out,
            occurred_at=entry.occurred_at,
            source=entry.source,
            conversation=entry.conversation_id,
        )
        command = ("XADD", ledger_writer.key, "*", *itertools.chain(*record.encode(rec).items()))
        execute = client.execute_command
        # The writer's retrying coroutine, as `write` awaited the reply before.
        sent = ledger_writer._written(
            rec.record_id, functools.partial(execute, *command), execute(*command)
        )
        protocol.data_received(REPLY)
        _drive(sent)

    for call in (runtime_path, record_path):  # warm up
        _per_call(call, calls // 10)
    return _per_call(runtime_path, calls), _per_call(record_path, calls)


async def round_trips(url: str, calls: int) -> list[float]:
    """Microseconds of lone XADDs to the test bed's Redis, each awaited before the next."""
    client = resp.Client.from_url(url)
    key = f"bench:ledger-record:{os.getpid()}"
    try:
        await client.execute_command("PING")
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await client.execute_command("XADD", key, "MAXLEN", "~", "1000", "*", "f", "v")
            times.append((time.perf_counter() - started) * 1e6)
        await client.execute_command("DEL", key)
    finally:
        await client.aclose()
    return sorted(times)


async def main_async(calls: int, trips: int) -> None:
    runtime_path, record_path = await in_process(calls)
    print(
        f"One record with its reply, in process ({calls:,} calls, median of 5): "
        f"the runtime's path (PlatformLedger.write → LedgerWriter.append) "
        f"{runtime_path:.1f} µs; a UsageRecord, its fields mapped and packed (before) "
        f"{record_path:.1f} µs."
    )
    url = os.environ.get("BMAD_REDIS_URL")
    if url and trips:
        times = await round_trips(url, trips)
        print(
            f"Lone XADD round trips to the test bed's Redis ({trips:,}): median "
            f"{times[len(times) // 2]:.1f} µs, p90 {times[len(times) * 9 // 10]:.1f} µs."
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--round-trips", type=int, default=5_000)
    args = parser.parse_args()
    asyncio.run(main_async(args.calls, args.round_trips))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
