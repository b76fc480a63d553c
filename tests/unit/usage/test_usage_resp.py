"""The ledger's small Redis client: the reply parser, the group commit, time-outs and
reconnection, against fakes (the real Redis is in tests/integration/usage)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis import exceptions as redis_errors

from bmad_integrations.usage import resp

pytestmark = pytest.mark.unit

STREAM = (
    b"+OK\r\n"
    b"-NOPERM this user has no permissions to access the 'x' key\r\n"
    b":42\r\n"
    b"$5\r\nhello\r\n"
    b"$-1\r\n"
    b"*2\r\n$1\r\na\r\n:7\r\n"
    b"$0\r\n\r\n"
    b"-WRONGPASS invalid username-password pair\r\n"
    b"-ERR unknown command\r\n"
)


def check(replies: list[resp.Reply]) -> None:
    assert replies[0] == "OK"
    assert isinstance(replies[1], redis_errors.NoPermissionError)
    assert "no permissions" in str(replies[1])
    assert replies[2:6] == [42, "hello", None, ["a", 7]]
    assert replies[6] == ""
    assert isinstance(replies[7], redis_errors.AuthenticationError)
    assert type(replies[8]) is redis_errors.ResponseError


def test_the_parser_reads_every_reply_kind_whole() -> None:
    check(resp.Parser().feed(STREAM))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13])
def test_the_parser_reads_replies_cut_anywhere(size: int) -> None:
    parser = resp.Parser()
    replies: list[resp.Reply] = []
    for start in range(0, len(STREAM), size):
        replies.extend(parser.feed(STREAM[start : start + size]))
    check(replies)


def test_the_parser_waits_for_a_bulk_string_cut_before_its_end() -> None:
    parser = resp.Parser()
    assert parser.feed(b"$10\r\n0123") == []
    assert parser.feed(b"456789") == []
    assert parser.feed(b"\r\n+OK") == ["0123456789"]
    assert parser.feed(b"\r\n") == ["OK"]


def test_pack_is_a_resp_array_of_bulk_strings() -> None:
    assert resp.pack(("XADD", "k", "*", b"f", 12, "é")) == (
        b"*6\r\n$4\r\nXADD\r\n$1\r\nk\r\n$1\r\n*\r\n$1\r\nf\r\n$2\r\n12\r\n$2\r\n\xc3\xa9\r\n"
    )


def _reference_pack(args: tuple[str | bytes | int, ...]) -> bytes:
    """RESP as the protocol defines it, argument by argument."""
    out = b"*%d\r\n" % len(args)
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        else:
            data = b"%d" % arg if isinstance(arg, int) else arg
        out += b"$%d\r\n" % len(data) + data + b"\r\n"
    return out


@pytest.mark.parametrize(
    "args",
    [
        ("XADD", "bmad:usage:ns:pm", "*", "v", "1", "id", "http:req.abc:0", "in", "12"),
        ("SET", "k", ""),  # an empty string
        ("SET", "k", "a\r\nb"),  # CRLF inside a bulk string is data
        ("SET", "k", "é"),  # only strings, one of them not ASCII: lengths in bytes
        ("SET", "k", "日本語", "x"),
        ("PING",),
        (),
    ],
)
def test_pack_of_strings_is_the_same_resp_as_argument_by_argument(
    args: tuple[str, ...],
) -> None:
    assert resp.pack(args) == _reference_pack(args)


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


async def test_commands_made_while_one_is_on_the_wire_leave_together_after_its_reply() -> None:
    protocol = resp._Protocol(timeout=5)
    transport = Transport()
    protocol.connection_made(transport)
    first = protocol.send(resp.pack(("ECHO", "0")))
    assert transport.writes == [resp.pack(("ECHO", "0"))]  # an idle connection: at once
    rest = [protocol.send(resp.pack(("ECHO", str(n)))) for n in range(1, 5)]
    assert len(transport.writes) == 1  # held while the first is unanswered
    protocol.data_received(b"$1\r\n0\r\n")
    assert first.result() == "0"
    assert transport.writes[1:] == [b"".join(resp.pack(("ECHO", str(n))) for n in range(1, 5))]
    # Replies resolve the commands in the order they were sent, however they arrive.
    protocol.data_received(b"$1\r\n1\r\n$1")
    protocol.data_received(b"\r\n2\r\n$1\r\n3\r\n$1\r\n4\r\n")
    assert [f.result() for f in rest] == ["1", "2", "3", "4"]
    later = protocol.send(resp.pack(("PING",)))
    assert len(transport.writes) == 3
    protocol.data_received(b"+PONG\r\n")
    assert await later == "PONG"


async def test_a_connected_client_puts_the_command_on_the_wire_before_it_is_awaited() -> None:
    client = resp.Client("127.0.0.1", 1, timeout=5)
    protocol = resp._Protocol(timeout=5)
    transport = Transport()
    protocol.connection_made(transport)
    client._protocol = protocol
    pending = client.execute_command("XADD", "k", "*", "f", "v")
    # Sent when called: the caller can work while Redis appends.
    assert transport.writes == [resp.pack(("XADD", "k", "*", "f", "v"))]
    refused = client.execute_command("XADD", "other", "*", "f", "v")
    protocol.data_received(b"$3\r\n1-0\r\n-NOPERM no permissions\r\n")
    assert await pending == "1-0"
    # An error reply is raised when awaited, as redis-py raises it.
    with pytest.raises(redis_errors.NoPermissionError):
        await refused


async def test_an_unanswered_command_times_out_and_fails_every_waiting_one() -> None:
    protocol = resp._Protocol(timeout=0.05)
    transport = Transport()
    protocol.connection_made(transport)
    first = protocol.send(resp.pack(("PING",)))
    second = protocol.send(resp.pack(("PING",)))
    with pytest.raises(redis_errors.TimeoutError, match="did not answer"):
        await first
    with pytest.raises(redis_errors.TimeoutError):
        await second
    assert transport.aborted
    # A connection that lost track of its replies takes no more commands.
    with pytest.raises(redis_errors.ConnectionError):
        await protocol.send(resp.pack(("PING",)))


async def test_a_reply_nobody_asked_for_fails_the_connection() -> None:
    protocol = resp._Protocol(timeout=5)
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(b"+OK\r\n")
    assert transport.aborted
    assert isinstance(protocol.lost, redis_errors.InvalidResponse)


class FakeRedis:
    """A server on loopback that answers PING and AUTH, counts connections, and can
    drop them or stop answering."""

    def __init__(self) -> None:
        self.connections = 0
        self.commands: list[bytes] = []
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = resp.Parser()
        try:
            while data := await reader.read(65536):
                for command in parser.feed(data):
                    assert isinstance(command, list)
                    name = str(command[0]).upper()
                    self.commands.append(name.encode())
                    if self.silent:
                        continue
                    if name == "AUTH":
                        ok = command[-1] == "right-password"
                        writer.write(b"+OK\r\n" if ok else b"-WRONGPASS invalid\r\n")
                    else:
                        writer.write(b"+PONG\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    def drop_all(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def fake_redis() -> AsyncIterator[FakeRedis]:
    fake = FakeRedis()
    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    try:
        yield fake
    finally:
        fake.server.close()
        fake.drop_all()


async def test_the_client_authenticates_then_reconnects_after_a_lost_connection(
    fake_redis: FakeRedis,
) -> None:
    client = resp.Client.from_url(
        f"redis://127.0.0.1:{fake_redis.port}/0", username="u", password="right-password"
    )
    try:
        assert (
            await asyncio.gather(*(client.execute_command("PING") for _ in range(3)))
            == ["PONG"] * 3
        )
        assert fake_redis.connections == 1
        assert fake_redis.commands == [b"AUTH", b"PING", b"PING", b"PING"]
        fake_redis.drop_all()
        with pytest.raises(redis_errors.ConnectionError):  # noqa: PT012
            async with asyncio.timeout(5):
                while True:  # until the client has seen the connection go
                    await client.execute_command("PING")
        assert await client.execute_command("PING") == "PONG"
        assert fake_redis.connections == 2
    finally:
        await client.aclose()


async def test_a_refused_password_is_an_authentication_error_without_the_password(
    fake_redis: FakeRedis,
) -> None:
    client = resp.Client.from_url(
        f"redis://127.0.0.1:{fake_redis.port}", username="u", password="wrong-secret-value"
    )
    try:
        with pytest.raises(redis_errors.AuthenticationError) as refused:
            await client.execute_command("PING")
        assert "wrong-secret-value" not in str(refused.value)
    finally:
        await client.aclose()


async def test_a_silent_server_times_the_command_out(fake_redis: FakeRedis) -> None:
    client = resp.Client.from_url(f"redis://127.0.0.1:{fake_redis.port}", timeout=0.1)
    fake_redis.silent = True
    try:
        with pytest.raises(redis_errors.TimeoutError):
            await client.execute_command("PING")
    finally:
        await client.aclose()


async def test_no_server_is_a_connection_error() -> None:
    client = resp.Client.from_url("redis://127.0.0.1:1/0", connect_timeout=0.5)
    with pytest.raises(redis_errors.ConnectionError, match=r"127\.0\.0\.1:1"):
        await client.execute_command("PING")
    await client.aclose()
    with pytest.raises(redis_errors.ConnectionError, match="closed"):
        await client.execute_command("PING")


def test_urls() -> None:
    plain = resp.Client.from_url("redis://redis.platform:6380/3")
    assert (plain.host, plain.port, plain.db, plain.tls, plain.username) == (
        "redis.platform",
        6380,
        3,
        None,
        None,
    )
    assert resp.Client.from_url("rediss://r").tls is not None
    with pytest.raises(ValueError, match="redis://"):
        resp.Client.from_url("http://r")


def test_the_parser_reads_a_group_of_bulk_replies_and_what_follows_them() -> None:
    parser = resp.Parser()
    # The replies of a group of XADDs in one read, then other kinds, then a cut reply.
    assert parser.feed(b"$3\r\n1-0\r\n$3\r\n1-1\r\n$0\r\n\r\n") == ["1-0", "1-1", ""]
    assert parser.feed(b"$3\r\n1-2\r\n$-1\r\n+OK\r\n$5\r\nhel") == ["1-2", None, "OK"]
    assert parser.feed(b"lo\r\n$3\r\n1-3\r\n") == ["hello", "1-3"]
    assert parser.feed(b"$3\r\n1-") == []
    assert parser.feed(b"4\r\n") == ["1-4"]


class NotAnAsyncioTransport:
    """A transport as uvloop's are: the same methods, not a subclass of asyncio's."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


async def test_a_transport_of_another_event_loop_carries_commands() -> None:
    protocol = resp._Protocol(timeout=5)
    transport = NotAnAsyncioTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    client = resp.Client("127.0.0.1", 1, timeout=5)
    client._protocol = protocol
    pending = client.execute_packed(resp.pack(("PING",)))
    assert transport.writes == [b"*1\r\n$4\r\nPING\r\n"]
    protocol.data_received(b"+PONG\r\n")
    assert await pending == "PONG"


def _ids(first: int, count: int) -> bytes:
    """The replies a group of ``count`` XADDs gets: entry ids as bulk strings."""
    return b"".join(
        b"$%d\r\n%b\r\n" % (len(i), i)
        for i in (b"1733112233%03d-0" % n for n in range(first, first + count))
    )


@pytest.mark.parametrize("piece", [1, 2, 5, 7, 23, 1000])
async def test_a_group_is_done_when_its_last_reply_is_in_however_the_replies_arrive(
    piece: int,
) -> None:
    protocol = resp._Protocol(timeout=5)
    transport = Transport()
    protocol.connection_made(transport)
    commands = [resp.pack(("XADD", "k", "*", "n", str(n))) for n in range(12)]
    group = protocol.send_group(commands)
    assert transport.writes == [b"".join(commands)]  # one write
    after = protocol.send(resp.pack(("GET", "b")))  # held behind the group
    data = _ids(0, 12)
    for start in range(0, len(data), piece):
        assert not group.done()
        protocol.data_received(data[start : start + piece])
    assert group.done()
    assert group.exception() is None
    assert len(transport.writes) == 2  # the GET left once the group was answered
    protocol.data_received(b"$2\r\nok\r\n")
    assert await after == "ok"
    assert protocol.in_flight == 0
    assert not protocol.waiting


async def test_a_group_fails_with_the_first_refusal_and_the_replies_after_it_still_line_up() -> (
    None
):
    protocol = resp._Protocol(timeout=5)
    transport = Transport()
    protocol.connection_made(transport)
    group = protocol.send_group([resp.pack(("XADD", "k", "*", "n", str(n))) for n in range(5)])
    single = protocol.send(resp.pack(("GET", "b")))
    second = protocol.send_group([resp.pack(("XADD", "k", "*", "n", "9"))] * 3)
    protocol.data_received(
        _ids(0, 2) + b"-NOPERM no permissions\r\n" + _ids(3, 1) + b"-ERR other\r\n"
    )
    with pytest.raises(redis_errors.NoPermissionError):
        await group
    assert not single.done()
    # The held commands left together; their replies arrive in one piece with an id run
    # longer than the group waiting at the head (read one by one, then).
    assert transport.writes[1].count(b"XADD") == 3
    assert transport.writes[1].startswith(b"*2")
    protocol.data_received(b"$1\r\nv\r\n" + _ids(10, 3))
    assert await single == "v"
    assert second.done()
    assert second.exception() is None
    assert protocol.in_flight == 0
    assert not protocol.waiting


async def test_a_group_on_a_lost_connection_fails_at_once() -> None:
    protocol = resp._Protocol(timeout=5)
    transport = Transport()
    protocol.connection_made(transport)
    group = protocol.send_group([resp.pack(("PING",))] * 2)
    protocol.connection_lost(None)
    with pytest.raises(redis_errors.ConnectionError, match="lost"):
        await group
    with pytest.raises(redis_errors.ConnectionError, match="closed"):
        await protocol.send_group([resp.pack(("PING",))])
