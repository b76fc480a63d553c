"""Benchmark: what the usage ledger adds to a runtime request, split into user and
system CPU, and where (a py-spy comparison).

`bench/runtime.py --ledger both` gives the ledger's cost as throughput and CPU ratios.
This takes the in-process store's runtime of that benchmark (the request whose only
I/O is the ledger's write) and serves it off, on and off again, back to back; per
concurrency level it reads the server's user and system CPU from ``/proc`` apart, and
the time each server spent in the garbage collector (all its levels, per request).
With ``--spy SECONDS`` it samples the server with py-spy at concurrency 1 (or
``--spy-concurrency``), off and on, and lists the frames whose samples per 1,000
requests grew the most (``--spy-self``: by the frame running, too). ``--pin`` pins as
`bench/runtime.py --pin` does. ``--alternate PAIRS`` runs both servers at once and
loads them in turn, PAIRS pairs per level, and reports the median of the pairs' on /
off ratios: a drift of the machine's speed, which moves one 5-second level by 15-25 %
here, then reaches both sides of each ratio (``--store real``: the real store's
runtime, as `bench/runtime.py`'s real table, instead of the in-process one); with
``--sets K``, K times over with servers started afresh each time, all rounds taken
together (a process can be a few percent faster or slower than an identical one for
its whole life: the control, ``twin``, measured 0.89 to 1.15 from one start to another).
``--stand-in yield|no-socket|ping|...`` serves "on" with a stand-in ledger (the table's
"on" column): a write that only yields to the event loop once; the ledger's own code
(record, checks, command) over a client that answers on the loop's next turn without a
socket (what is left to the real write is the round trip); or one PING to the test
bed's Redis over the ledger's own client and connection, awaited before the answer
leaves, with no record made (the least a write that waits for Redis's acknowledgement
costs: the floor under any ledger that promises no answer without a stored record);
or ``wake``, a reply from a thread of the server's own after about that round trip,
through the event loop's self-pipe (the wait and the wake-up by a socket, with no
other process and no TCP; at concurrency 1 only, since under load the thread waits
for the GIL); ``block`` or ``spin``, one PING over a socket of the stand-in's own,
sent and received without suspending the request (a blocking receive, in which the
thread sleeps; or a receive polled until the reply is in, so that nothing sleeps), its
round trips printed when the server stops; or ``spool``, a sketch of a ledger that does
not wait: the record appended to a file and shipped to Redis in the background every
2 ms (``BENCH_SPOOL_DELAY``), its reply ready at once; ``mmap``, the same sketch with
the record copied into a memory map of the file instead of written. "on" is the
runtime's ledger as the operator sets it up, with its usage spool
(`bmad_integrations.usage.spool`); ``wait`` is the ledger without a spool, every
answer waiting for Redis to acknowledge its record; ``ship-100ms`` the spool shipping
every 100 ms instead of 20; ``no-ship`` the spool shipping nothing during the run (the
records' cost in the request alone); ``disk`` the spool in a directory on disk (``/tmp``)
instead of in memory (``/dev/shm``, as the pod's memory-backed emptyDir).
With ``--alternate``, ``--sides off on ping ...`` serves several of them at once and
loads them in turn, each round every side once (the order rotating), each side's
ratio to "off" taken within the round. ``twin`` is a second server with the ledger
off: the control, how far two identical servers measure apart.

    set -a; eval "$(.venv/bin/bmad testbed up --no-cluster --services redis)"; set +a
    .venv/bin/python bench/ledger_cost.py --spy 8

(``--store real`` needs the test bed's PostgreSQL too: ``--services postgres,redis``.)

Needs wrk (Debian package) and, for ``--spy``, py-spy (the bench extra).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil


def _sibling(name: str) -> Any:
    """The sibling benchmark ``bench/<name>.py`` (its servers and ledger set-up)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


bench_runtime = _sibling("runtime")
STAND_INS = [
    "yield",
    "no-socket",
    "ping",
    "wake",
    "block",
    "spin",
    "spool",
    "mmap",
    "wait",
    "ship-100ms",
    "no-ship",
    "disk",
]


def wrk(url: str, script: Path, *, concurrency: int, seconds: float) -> int:
    """Requests wrk completed in ``seconds``."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "-s",
            str(script),
            f"{url}/v1/invoke",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if "requests in" in line)
    return int(line.split()[0])


def split(extra: dict[str, str], script: Path, levels: list[int], seconds: float) -> list[str]:
    gc_report = Path(tempfile.mkdtemp(prefix="bench-gc-")) / "gc.json"
    proc, url = bench_runtime.start("runtime", {**extra, bench_runtime.GC_STATS: str(gc_report)})
    server = psutil.Process(proc.pid)
    rows = []
    served = 0
    try:
        for level in levels:
            served += wrk(url, script, concurrency=level, seconds=2)  # warm up
            before = server.cpu_times()
            done = wrk(url, script, concurrency=level, seconds=seconds)
            after = server.cpu_times()
            served += done
            rows.append(
                f"{done / seconds:.0f}|{1e6 * (after.user - before.user) / done:.0f}|"
                f"{1e6 * (after.system - before.system) / done:.0f}"
            )
    finally:
        bench_runtime.stop(proc)
    # The server's collector over all its levels, warm-ups included.
    collected = json.loads(gc_report.read_text())
    gc_report.unlink()
    gc_report.parent.rmdir()
    rows.append(
        f"{1e6 * collected['seconds'] / served:.0f} µs a request in "
        f"{collected['collections']} collections"
    )
    return rows


def frames(
    extra: dict[str, str], script: Path, seconds: float, concurrency: int, *, self_time: bool
) -> tuple[dict[str, float], float]:
    """Samples per 1,000 requests by frame (inclusive; with ``self_time`` also each frame
    running when sampled, as ``self: <frame>``), and in all, at one concurrency."""
    proc, url = bench_runtime.start("runtime", extra)
    done = 0

    def run_load() -> None:
        nonlocal done
        done = wrk(url, script, concurrency=concurrency, seconds=seconds)

    server = psutil.Process(proc.pid)
    try:
        before = server.cpu_times()
        stacks = bench_runtime.record_stacks(
            proc.pid, rate=250, seconds=seconds, load=run_load, full_filenames=False
        )
        after = server.cpu_times()
    finally:
        bench_runtime.stop(proc)
    print(
        f"py-spy run: {done / seconds:.0f} requests/s, server CPU "
        f"{1e6 * (after.user - before.user) / done:.0f} µs user and "
        f"{1e6 * (after.system - before.system) / done:.0f} µs system per request"
    )
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for name in {frame.split(" (")[0] for frame in stack.split(";")}:
            inclusive[name] += int(count)
        if self_time:  # the frame running when sampled, apart
            inclusive["self: " + stack.split(";")[-1].split(" (")[0]] += int(count)
    per = 1000 / done
    return {name: n * per for name, n in inclusive.items()}, total * per


def split_table(script: Path, levels: list[int], seconds: float, stand_in: str | None) -> None:
    """Off, on, off again: requests/s and user and system CPU per request, printed.
    With ``stand_in``, "on" is that stand-in ledger (`bench/runtime.py`), not Redis."""
    first = split({}, script, levels, seconds)
    with bench_runtime.BenchLedger(os.environ["BMAD_REDIS_URL"]) as ledger_env:
        env = {bench_runtime.LEDGER_STAND_IN: stand_in, **ledger_env} if stand_in else ledger_env
        on = split(env, script, levels, seconds)
    last = split({}, script, levels, seconds)
    print(
        "The garbage collector, off → on → off: "
        + " → ".join(rows[-1] for rows in (first, on, last))
        + "\n"
    )
    print(
        "| concurrency | req/s off → on → off | user µs/req off → on → off | "
        "system µs/req off → on → off |"
    )
    print("|---:|---:|---:|---:|")
    for level, a, b, c in zip(levels, first[:-1], on[:-1], last[:-1], strict=True):
        cols = [x.split("|") for x in (a, b, c)]
        print(
            f"| {level} | "
            + " | ".join(" → ".join(col[i] for col in cols) for i in range(3))
            + " |"
        )


def _serve_sides(
    stack: contextlib.ExitStack, sides: list[str], ledger_env: dict[str, str], store: str
) -> dict[str, tuple[psutil.Process, str]]:
    """One server per side, started now (stopped with ``stack``)."""
    servers = {}
    for side in sides:
        ledger: dict[str, str] = (
            {}
            if side in ("off", "twin")
            else ledger_env
            if side == "on"
            else {bench_runtime.LEDGER_STAND_IN: side, **ledger_env}
        )
        kind, extra = "runtime", ledger
        if store == "real":
            dsn = stack.enter_context(bench_runtime.Database(os.environ["BMAD_POSTGRES_URL"]))
            kind = "store"
            extra = {
                bench_runtime.STORE_DSN: dsn,
                bench_runtime.STORE_REDIS: os.environ["BMAD_REDIS_URL"],
                **ledger,
            }
        proc, url = bench_runtime.start(kind, extra)
        stack.callback(bench_runtime.stop, proc)
        servers[side] = (psutil.Process(proc.pid), url)
    return servers


def median_interval(sets: list[list[float]], *, draws: int = 4000) -> tuple[float, float]:
    """A 95 % interval of the median of the rounds' ratios, by the bootstrap over the
    sets and then the rounds within each drawn set (the rounds of one set of servers
    are not independent of each other: they share its processes)."""
    rng = random.Random(0)  # the same interval for the same rounds
    medians = []
    for _ in range(draws):
        pooled = []
        for rounds in rng.choices(sets, k=len(sets)):
            pooled += rng.choices(rounds, k=len(rounds))
        medians.append(statistics.median(pooled))
    medians.sort()
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def alternate(
    script: Path,
    levels: list[int],
    seconds: float,
    pairs: int,
    *,
    sides: list[str],
    store: str = "in-process",
    sets: int = 1,
) -> None:
    """All the servers up at once, loaded in turn: per level ``pairs`` rounds, each
    loading every side once (the order rotating from round to round), each side's
    ratio to "off" taken within the round, so that a drift of the machine's speed
    reaches both sides of it; printed: the medians and the range of the rounds' ratios.
    ``sides``: "off" first, then "on" (the ledger on the test bed's Redis) and any
    stand-in ledgers (`bench/runtime.py`), e.g. ``off on ping``. ``store`` "real": every
    server is `bench/runtime.py`'s real store table's (the test bed's PostgreSQL and
    Redis bound, a fresh database each). ``sets``: the whole run that many times, each
    with servers started afresh, the rounds of all sets taken together: one process can
    run a few percent faster or slower than an identical one for its whole life (where
    its memory landed), which rounds of the same processes cannot average out."""
    if sides[0] != "off" or len(set(sides)) != len(sides) or len(sides) < 2:
        raise SystemExit(
            f"--sides: off first, then one or more of twin, on, {', '.join(STAND_INS)}"
        )
    others = sides[1:]
    rates: dict[tuple[int, str], list[float]] = {(lv, side): [] for lv in levels for side in sides}
    cpu = {(level, side): [] for level in levels for side in sides}
    # The server's voluntary context switches a request: the times it slept (its event
    # loop blocked in epoll_wait) with nothing to do but wait.
    sleeps = {(level, side): [] for level in levels for side in sides}
    # Each set's rounds' on / off ratios, by level and side.
    by_set: dict[tuple[int, str], list[list[float]]] = {
        (lv, side): [] for lv in levels for side in others
    }
    with bench_runtime.BenchLedger(os.environ["BMAD_REDIS_URL"]) as ledger_env:
        for _ in range(sets):
            with contextlib.ExitStack() as stack:
                servers = _serve_sides(stack, sides, ledger_env, store)
                for level in levels:
                    for _, url in servers.values():
                        wrk(url, script, concurrency=level, seconds=2)  # warm up
                    in_set: dict[str, list[float]] = {side: [] for side in others}
                    for pair in range(pairs):
                        turn = pair % len(sides)
                        for side in sides[turn:] + sides[:turn]:
                            server, url = servers[side]
                            before, switched = server.cpu_times(), server.num_ctx_switches()
                            done = wrk(url, script, concurrency=level, seconds=seconds)
                            after = server.cpu_times()
                            used = after.user + after.system - before.user - before.system
                            rates[level, side].append(done / seconds)
                            cpu[level, side].append(1e6 * used / done)
                            sleeps[level, side].append(
                                (server.num_ctx_switches().voluntary - switched.voluntary) / done
                            )
                        for side in others:
                            in_set[side].append(rates[level, side][-1] / rates[level, "off"][-1])
                    for side in others:
                        by_set[level, side].append(in_set[side])
    rounds = f"{pairs * sets} rounds" + (f" ({sets} sets of {pairs})" if sets > 1 else "")
    print(
        f"| concurrency | side | req/s (median) | / off, median of {rounds} | / off, range | "
        + ("medians of the sets | " if sets > 1 else "")
        + "95 % interval of the median | CPU µs/req (median) | sleeps/req (median) |"
    )
    print("|---:|---|---:|---:|---:|" + ("---|" if sets > 1 else "") + "---:|---:|---:|")
    for level in levels:
        for side in sides:
            key = (level, side)
            if side == "off":
                ratio = "1 | " + (" | " if sets > 1 else "") + " | "
            else:
                pooled = [r for rounds in by_set[key] for r in rounds]
                ratio = f"{statistics.median(pooled):.2f} | {min(pooled):.2f} to {max(pooled):.2f}"
                if sets > 1:
                    ratio += " | " + " ".join(
                        f"{statistics.median(rounds):.2f}" for rounds in by_set[key]
                    )
                low, high = median_interval(by_set[key])
                ratio += f" | {low:.2f} to {high:.2f}"
            print(
                f"| {level} | {side} | {statistics.median(rates[key]):.0f} | {ratio} | "
                f"{statistics.median(cpu[key]):.0f} | {statistics.median(sleeps[key]):.2f} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--spy", type=float, default=0.0, help="py-spy this long, off and on")
    parser.add_argument(
        "--spy-concurrency", type=int, default=1, help="the load while py-spy samples"
    )
    parser.add_argument("--spy-only", action="store_true", help="skip the CPU split, only py-spy")
    parser.add_argument(
        "--spy-self", action="store_true", help="list frames by their own samples too"
    )
    parser.add_argument("--pin", action="store_true", help="as bench/runtime.py --pin (`Pinning`)")
    parser.add_argument(
        "--stand-in",
        choices=STAND_INS,
        help="'on' with a stand-in ledger instead of Redis: one that only yields to the "
        "event loop, the ledger's own code over a client with no socket, or one PING "
        "to the platform Redis over the ledger's client awaited (no record), or a reply "
        "from a thread of the server's after ~40 µs (wake; concurrency 1 only), one PING "
        "over a socket of its own without suspending the request (block: a blocking "
        "receive; spin: a polled one), or the ledger's record spooled to a file and "
        "shipped in the background (spool, a sketch)",
    )
    parser.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead of off → on → off: the servers (off and on, or --sides) up at once, "
        "loaded in turn PAIRS rounds per level (--seconds each), each side's ratio to off "
        "within its round",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=["off", "twin", "on", *STAND_INS],
        help="with --alternate: the servers loaded in turn, off first (default: off and on, "
        "or off and the --stand-in); twin: a second server with the ledger off (the "
        "control: how far two identical servers measure apart)",
    )
    parser.add_argument(
        "--sets",
        type=int,
        default=1,
        help="with --alternate: the whole run this many times, each with servers started "
        "afresh, the rounds of all taken together (one process may be faster or slower "
        "than an identical one for its whole life)",
    )
    parser.add_argument(
        "--store",
        choices=["in-process", "real"],
        default="in-process",
        help="with --alternate: the in-process store's runtime (default), or the real "
        "store's (the test bed's PostgreSQL and Redis, as bench/runtime.py's real table)",
    )
    args = parser.parse_args()
    if args.pin:
        bench_runtime.pin()
    if not os.environ.get("BMAD_REDIS_URL"):
        raise SystemExit("needs the test bed's Redis as the ledger (BMAD_REDIS_URL)")
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as folder:
        script = Path(folder) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(bench_runtime.BODY))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        if args.alternate:
            sides = args.sides or ["off", args.stand_in or "on"]
            alternate(
                script,
                args.concurrency,
                args.seconds,
                args.alternate,
                sides=sides,
                store=args.store,
                sets=args.sets,
            )
        elif not args.spy_only:
            split_table(script, args.concurrency, args.seconds, args.stand_in)
        if args.spy:
            level = args.spy_concurrency
            off_frames, off_total = frames({}, script, args.spy, level, self_time=args.spy_self)
            with bench_runtime.BenchLedger(os.environ["BMAD_REDIS_URL"]) as env:
                on_frames, on_total = frames(env, script, args.spy, level, self_time=args.spy_self)
            print(
                f"\npy-spy samples per 1,000 requests at concurrency {level} (250 Hz): off "
                f"{off_total:.1f}, on {on_total:.1f}\n"
            )
            print("| frame (inclusive) | off | on | on - off |")
            print("|---|---:|---:|---:|")
            grown = sorted(
                set(off_frames) | set(on_frames),
                key=lambda n: on_frames.get(n, 0) - off_frames.get(n, 0),
                reverse=True,
            )
            for name in grown[:30]:
                a_, b_ = off_frames.get(name, 0.0), on_frames.get(name, 0.0)
                print(f"| `{name}` | {a_:.1f} | {b_:.1f} | {b_ - a_:+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
