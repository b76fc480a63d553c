"""The writer's fast path (`LedgerWriter.append`): the same checks as a `UsageRecord`,
the bytes `resp.pack` makes of its fields (`record.encode`), and the error type it is
given."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Awaitable
from typing import Any

import pytest
from redis import exceptions as redis_errors

from bmad_integrations.usage import record, resp, writer

pytestmark = pytest.mark.unit

AT = dt.datetime(2026, 3, 31, 23, 59, 59, 500_000, tzinfo=dt.UTC)
PLUS_TWO = dt.timezone(dt.timedelta(hours=2))


def fields(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tenant": "acme",
        "record_id": record.request_record_id("req-1.0123456789abcdef0123456789abcdef"),
        "provider": "openai",
        "model": "gpt-4o",
        "tokens_in": 120,
        "tokens_out": 30,
        "occurred_at": AT,
        "source": "http",
        "conversation": "c-1",
    }
    base.update(changes)
    return base


def reference(w: writer.LedgerWriter, **kw: Any) -> bytes:
    """The XADD of the record of these fields, mapped by `record.encode` and packed by
    `resp.pack` (how `write` sent a record until it handed it to `append`)."""
    rec = record.UsageRecord(namespace=w.namespace, agent=w.agent, **kw)
    items = itertools.chain.from_iterable(record.encode(rec).items())
    return resp.pack(("XADD", w.key, "*", *items))


CASES = [
    fields(),
    fields(conversation=None),
    fields(source="task", record_id=record.task_record_id("t" * 256)),  # a hashed id
    fields(tokens_in=0, tokens_out=record.MAX_TOKENS),
    fields(provider="fournisseur-é", model="modèle 100% ✓", conversation="fil ∞"),
    fields(model="%s%d%b%%", conversation="%"),  # a bytes format's own marks
    fields(occurred_at=AT.astimezone(PLUS_TWO)),  # written in UTC, as a record is
    fields(tenant="other.tenant-9"),
    fields(occurred_at=AT.replace(microsecond=0)),  # isoformat leaves the fraction out
    fields(occurred_at=AT.replace(microsecond=7)),
    fields(occurred_at=dt.datetime(987, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)),  # a short year
]


async def test_records_of_one_second_and_the_next_carry_their_own_times() -> None:
    # The writer formats a second once (`LedgerWriter._second`): every record's time is
    # still its own, whether its second is the last one's or not.
    client = Packed()
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    times = [
        AT,
        AT.replace(microsecond=1),
        AT + dt.timedelta(microseconds=500_000),  # the next second, the next day and month
        AT.replace(microsecond=0),
        AT - dt.timedelta(days=366),  # the same clock time a year before
        AT,
    ]
    for when in times:
        await w.append(**fields(occurred_at=when))
    assert client.commands == [reference(w, **fields(occurred_at=when)) for when in times]


class Packed:
    """A client like `resp.Client` on a live connection: keeps each packed command and
    answers it at once."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    def execute_packed(self, command: bytes) -> Awaitable[Any]:
        self.commands.append(command)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result("1-0")
        return done

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        return self.execute_packed(resp.pack(args))

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("kw", CASES)
async def test_append_sends_byte_for_byte_the_packed_xadd_of_the_record(kw: dict[str, Any]) -> None:
    client = Packed()
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    assert await w.append(**kw) == "1-0"
    (command,) = client.commands
    assert command == reference(w, **kw)
    # Decoded by the ingester's codec, it is the record.
    (args,) = resp.Parser().feed(command)  # an array of strings
    assert isinstance(args, list)
    entry = dict(zip(args[3::2], args[4::2], strict=True))
    expected = record.UsageRecord(namespace="acme-dev", agent="analyst", **kw)
    assert record.decode(entry) == expected


REFUSALS = [
    ({"tokens_in": True}, "must be an integer"),
    ({"tokens_out": -1}, "must be 0.."),
    ({"tokens_in": record.MAX_TOKENS + 1}, "must be 0.."),
    ({"tokens_out": 1.5}, "must be an integer"),
    ({"record_id": "has space"}, "printable ASCII"),
    ({"record_id": ""}, "printable ASCII"),
    ({"tenant": "Not_A_Name"}, "not a Kubernetes object name"),
    ({"provider": "bad\nprovider"}, "control characters"),
    ({"conversation": "x" * (record.MAX_TEXT_CHARS + 1)}, "conversation"),
    ({"source": "mail"}, "source must be one of"),
    ({"occurred_at": AT.replace(tzinfo=None)}, "time zone"),
    ({"conversation": "tab\there"}, "control characters"),
    ({"record_id": "x" * (record.MAX_ID_CHARS + 1)}, "printable ASCII"),
]


@pytest.mark.parametrize(("change", "reason"), REFUSALS)
def test_append_refuses_what_a_usage_record_refuses(change: dict[str, Any], reason: str) -> None:
    client = resp.Client("127.0.0.1", 1)
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    with pytest.raises(record.RecordError, match=reason):
        record.UsageRecord(namespace="acme-dev", agent="analyst", **fields(**change))
    with pytest.raises(record.RecordError, match=reason):
        w.append(**fields(**change))


@pytest.mark.parametrize(("change", "reason"), REFUSALS)
async def test_a_writer_that_knows_the_kind_of_record_still_refuses_each_bad_field(
    change: dict[str, Any], reason: str
) -> None:
    # After a first record of a kind the writer tests only the fields that change from
    # call to call (`record.call_fields_pass`): each bad one still goes to the full
    # check, and is refused with its reason.
    client = Packed()
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    await w.append(**fields())
    await w.append(**fields(conversation=None))
    with pytest.raises(record.RecordError, match=reason):
        w.append(**fields(**change))
    assert len(client.commands) == 2
    # A conversation the quick test leaves to the full one (not ASCII) still passes.
    await w.append(**fields(conversation="fil ∞"))
    assert len(client.commands) == 3


class RedisPyLike:
    """A client with only redis-py's ``execute_command``: `append` gives it the command's
    arguments."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        self.commands.append(args)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(b"1-0")
        return done

    async def aclose(self) -> None:
        pass


async def test_a_client_without_packed_commands_gets_the_same_command_as_arguments() -> None:
    client = RedisPyLike()
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    assert await w.append(**fields()) == "1-0"
    (command,) = client.commands
    assert resp.pack(command) == reference(w, **fields())


async def test_write_sends_its_record_as_append_does_and_refuses_another_streams() -> None:
    client = Packed()
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    rec = record.UsageRecord(namespace="acme-dev", agent="analyst", **fields())
    assert await w.write(rec) == "1-0"
    assert client.commands == [reference(w, **fields())]
    other = record.UsageRecord(namespace="acme-dev", agent="dev", **fields())
    with pytest.raises(record.RecordError, match="cannot go to the stream of") as refused:
        w.write(other)
    assert refused.value.reason == "WrongStream"
    assert len(client.commands) == 1


class Unavailable(writer.LedgerUnavailable):
    pass


class Refusing:
    """A client whose every command Redis refuses with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sent = 0

    def execute_packed(self, command: bytes) -> Awaitable[Any]:
        self.sent += 1
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(self.error)
        return failed

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        return self.execute_packed(resp.pack(args))

    async def aclose(self) -> None:
        pass


async def test_a_refused_write_raises_the_error_type_the_writer_was_given() -> None:
    client = Refusing(redis_errors.NoPermissionError("NOPERM no permissions"))
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst", unavailable=Unavailable)
    with pytest.raises(Unavailable, match="refused this agent's credentials"):
        await w.append(**fields())
    assert client.sent == 1  # refused credentials are not retried


async def test_a_lost_connection_is_retried_with_the_same_bytes_then_gives_up() -> None:
    client = Refusing(redis_errors.ConnectionError("gone"))
    w = writer.LedgerWriter(
        client, namespace="acme-dev", agent="analyst", attempts=3, backoff=0.0, backoff_max=0.0
    )
    with pytest.raises(writer.LedgerUnavailable, match="after 3 attempts"):
        await w.append(**fields())
    assert client.sent == 3


async def test_one_writer_encodes_every_kind_of_record_past_its_templates_bound() -> None:
    client = Packed()
    w = writer.LedgerWriter(client, namespace="acme-dev", agent="analyst")
    kinds = [
        fields(model=f"model-{n}", source=source, conversation=conversation)
        for n in range(writer._TEMPLATES_MAX)
        for source, conversation in (("http", "c-1"), ("task", None))
    ]
    for kw in [*kinds, *kinds[:3]]:  # more kinds than it keeps, then the first again
        assert await w.append(**kw) == "1-0"
        assert client.commands[-1] == reference(w, **kw)
    assert len(w._templates) <= writer._TEMPLATES_MAX
