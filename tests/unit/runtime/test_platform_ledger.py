"""The runtime's platform ledger (`bmad_runtime.ledger.PlatformLedger`) over fakes of
the ledger's client: what it raises, and how often it reads the tenant's budget. The
real Redis: tests/integration/usage and tests/integration/operator."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable
from typing import Any

import pytest
from redis import exceptions as redis_errors

from bmad_integrations.usage import budget, resp, writer
from bmad_runtime import ledger, ports

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


class Client:
    """Answers XADD with ``xadd`` (a value or an exception) and GET with ``get``."""

    def __init__(self, xadd: Any = "1-0", get: Any = None) -> None:
        self.xadd = xadd
        self.get = get
        self.commands: list[bytes] = []

    def _answer(self, value: Any) -> Awaitable[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
        return future

    def execute_packed(self, command: bytes) -> Awaitable[Any]:
        self.commands.append(command)
        return self._answer(self.xadd)

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        if args[0] == "GET":
            self.commands.append(resp.pack(args))
            return self._answer(self.get)
        return self.execute_packed(resp.pack(args))

    async def aclose(self) -> None:
        pass


def platform(client: Client, **kw: Any) -> ledger.PlatformLedger:
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst", attempts=2, backoff=0.0)
    return ledger.PlatformLedger(w, tenant="acme", **kw)


def entry(**changes: Any) -> ports.LedgerEntry:
    fields: dict[str, Any] = {
        "record_id": "http:req-1.00ff:0",
        "source": "http",
        "provider": "echo",
        "model": "echo-1",
        "tokens_in": 3,
        "tokens_out": 4,
        "conversation_id": "c_1",
        "occurred_at": NOW,
    }
    fields.update(changes)
    return ports.LedgerEntry(**fields)


async def test_a_written_record_is_one_xadd_on_the_agents_stream() -> None:
    client = Client()
    await platform(client).write(entry())
    (command,) = client.commands
    (args,) = resp.Parser().feed(command)
    assert isinstance(args, list)
    assert args[:3] == ["XADD", "bmad:usage:acme-dev:analyst", "*"]
    fields = dict(zip(args[3::2], args[4::2], strict=True))
    assert fields["tenant"] == "acme"
    assert (fields["in"], fields["out"], fields["conv"]) == ("3", "4", "c_1")


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (redis_errors.NoPermissionError("NOPERM"), "refused this agent's credentials"),
        (redis_errors.ConnectionError("gone"), "unreachable after 2 attempts"),
    ],
)
async def test_a_record_the_ledger_cannot_take_is_the_runtimes_unavailable_error(
    error: Exception, says: str
) -> None:
    sent = platform(Client(xadd=error)).write(entry())
    with pytest.raises(ports.LedgerUnavailableError, match=says) as raised:
        await sent
    assert str(raised.value).startswith("the usage record of this call could not be written")


async def test_an_invalid_record_is_refused_when_awaited_and_nothing_is_sent() -> None:
    client = Client()
    sent = platform(client).write(entry(tokens_in=-1))  # no exception yet
    with pytest.raises(ports.LedgerUnavailableError, match="tokens_in must be 0"):
        await sent
    assert client.commands == []


def over_budget() -> budget.State:
    return budget.State(
        exhausted=True,
        limit=1000,
        used=1200,
        period_start=NOW.replace(day=1, hour=0),
        resets_at=NOW.replace(month=NOW.month, day=1, hour=0) + dt.timedelta(days=31),
    )


async def settle() -> None:
    """Let a read started in the background run to its end."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_budget_is_read_once_per_cache_period_and_kept_when_a_read_fails() -> None:
    client = Client(get=budget.encode(over_budget()))
    clock = [100.0]
    ledger_ = platform(client, cache_seconds=2.0, clock=lambda: NOW, monotonic=lambda: clock[0])
    first = await ledger_.exhausted()  # the first read, awaited
    assert first is not None
    assert (first.limit, first.used) == (1000, 1200)
    clock[0] += 1.0
    assert await ledger_.exhausted() == first
    await settle()
    assert len(client.commands) == 1  # within the period: no second GET
    clock[0] += 1.5
    client.get = redis_errors.ConnectionError("gone")
    assert await ledger_.exhausted() == first  # read again in the background meanwhile
    await settle()
    assert len(client.commands) == 2
    assert await ledger_.exhausted() == first  # a failed read keeps the last state
    client.get = None  # the operator cleared the key
    clock[0] += 1.0  # within a period of the failed read: not read again
    assert await ledger_.exhausted() == first
    await settle()
    assert len(client.commands) == 2
    clock[0] += 1.0
    await ledger_.exhausted()
    await settle()
    assert len(client.commands) == 3
    assert await ledger_.exhausted() is None  # work resumes


class Held(Client):
    """A client whose GETs after the first ``answered`` wait for ``gate``."""

    def __init__(self, answered: int, get: Any) -> None:
        super().__init__(get=get)
        self.answered = answered
        self.gate: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        if args[0] == "GET" and self.answered <= 0:
            self.commands.append(resp.pack(args))
            return self.gate
        self.answered -= args[0] == "GET"
        return super().execute_command(*args)


async def test_calls_that_come_together_make_one_read_and_wait_for_the_first() -> None:
    client = Held(answered=0, get=None)
    ledger_ = platform(client, cache_seconds=2.0, clock=lambda: NOW, monotonic=lambda: 100.0)
    calls = [asyncio.ensure_future(ledger_.exhausted()) for _ in range(64)]
    await settle()
    assert not any(call.done() for call in calls)  # no state yet: every call waits
    client.gate.set_result(budget.encode(over_budget()))
    results = await asyncio.gather(*calls)
    assert {(r.limit, r.used) for r in results if r is not None} == {(1000, 1200)}
    assert None not in results
    assert len(client.commands) == 1  # one GET for the 64


async def test_a_read_that_hangs_holds_up_no_call_once_a_state_was_read() -> None:
    """While the platform Redis does not answer (a partition), calls go on with the last
    state at once, and the replica has one GET out at a time, not one a call."""
    client = Held(answered=1, get=budget.encode(over_budget()))
    clock = [100.0]
    ledger_ = platform(client, cache_seconds=2.0, clock=lambda: NOW, monotonic=lambda: clock[0])
    first = await ledger_.exhausted()
    assert first is not None
    clock[0] += 2.5
    for _ in range(50):
        assert await asyncio.wait_for(ledger_.exhausted(), 1.0) == first
    await settle()
    assert len(client.commands) == 2
    clock[0] += 3.0  # a period later, the read still in flight: not a second one
    assert await ledger_.exhausted() == first
    await settle()
    assert len(client.commands) == 2
    reading = ledger_._reading
    assert reading is not None
    assert not reading.done()
    await ledger_.aclose()  # the read still waiting is cancelled, not left behind
    await settle()
    assert reading.cancelled()


async def test_the_runtime_spools_and_falls_back_to_waiting_when_its_spool_is_taken(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """BMAD_USAGE_LEDGER_SPOOL gives the writer a spool; a directory another process
    holds gives an error in the log and the ledger that waits for Redis, not a crash."""
    import contextlib

    from bmad_integrations.usage import record, spool
    from bmad_runtime import settings as settings_mod
    from bmad_runtime import wiring

    def runtime_settings(folder: Any) -> settings_mod.RuntimeSettings:
        return settings_mod.RuntimeSettings(
            agent_name="analyst",
            agent_namespace="acme-dev",
            tenant="acme",
            usage_ledger_url="redis://127.0.0.1:1/0",
            usage_ledger_password="p" * 32,
            usage_ledger_spool=str(folder),
        )

    async with contextlib.AsyncExitStack() as stack:
        made = wiring._ledger(runtime_settings(tmp_path / "own"), stack)
        assert isinstance(made, ledger.PlatformLedger)
        assert isinstance(made.writer.client, spool.SpoolingClient)
    held = spool.Spool(tmp_path / "taken", Client(), key=record.stream_key("acme-dev", "analyst"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            made = wiring._ledger(runtime_settings(tmp_path / "taken"), stack)
            assert isinstance(made, ledger.PlatformLedger)
            assert isinstance(made.writer.client, resp.Client)
    finally:
        await held.aclose()
    assert "another process holds the usage spool" in caplog.text
    assert "every answer waits for the platform Redis" in caplog.text
