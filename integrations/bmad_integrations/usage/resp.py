"""A small pipelined Redis client for the ledger's hot path: one XADD per answer.

Every answer an agent gives is appended to its usage stream before it leaves the
runtime (`writer`), so the cost of that one command is paid by every request. With
redis-py's asyncio client it was 250-310 µs of CPU per XADD on this project's test
machine (connection pool checkout, retry and timeout wrappers, a reply parser built on
stream readers); this client takes 85-110 µs one command at a time and about 30 µs
per record with 16 in flight, where a bare asyncio protocol that only writes the
command and waits for its reply takes 70-80 µs (measured during development against
the test bed's Redis, with throwaway scripts). The runtime's benchmark with the ledger
on is to stay within 10% of it with the ledger off (docs/billing.md), and a request
there costs well under 1 ms of CPU in all.

So the ledger talks RESP2 itself, over one connection per writer:
- a command goes out at once when the connection is idle; the ones made while
  commands are on the wire (the records of concurrent answers) are held and leave
  together in one write when the last reply is in; replies are matched in order
  (Redis answers a connection's commands in the order it received them): a group
  commit that waits for no timer, and adds no delay to a lone request;
- on a connection that is up, `Client.execute_command` sends (or queues) the command
  when it is called and gives back the reply's future itself to await (no coroutine
  around it): the runtime puts its XADD on the wire and serialises the answer while
  Redis appends; `Client.execute_packed` takes a command already packed (the writer
  fills one bytes format per record, `writer.LedgerWriter.append`);
- the replies of a group (bulk strings, the entry ids) are read straight from the
  bytes received; an error reply is raised from the command's future when awaited;
  commands whose replies only have to be counted (the spool's shipment of records,
  `Client.execute_many`) share one future, and a run of entry ids is counted in C;
- the connection is opened on first use and again after it is lost; ``AUTH`` with the
  agent's ACL user and ``SELECT`` of the URL's database come first, TLS with the
  platform's CA when the URL is ``rediss://``;
- a command not answered within ``timeout`` closes the connection: every command
  waiting on it fails (its reply can no longer be told apart) and the caller retries;
- errors are redis-py's exception classes, so a caller handles both clients alike;
- it runs on asyncio's event loop or another one with asyncio's protocol interface
  (uvloop's transports are not subclasses of asyncio's and are taken as they are).

It is not a general client: no RESP3, no pub/sub, no cluster, no blocking commands.
Secrets (the password) are sent in ``AUTH`` and never put into an exception or log.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import ssl
import urllib.parse
from collections.abc import Awaitable
from typing import TypeAlias, cast

from redis import exceptions as redis_errors

Reply: TypeAlias = "str | int | list[Reply] | redis_errors.RedisError | None"

_CRLF = b"\r\n"
# A run of whole bulk-string replies that are stream entry ids ("$15\r\n1733112233444-0\r\n"
# each): what a group of XADDs gets back, two lines a reply.
_ENTRY_IDS = re.compile(rb"(?:\$[0-9]+\r\n[0-9]+-[0-9]+\r\n)*")

# Error prefixes Redis sends, and the redis-py exception each becomes.
_ERRORS: dict[str, type[redis_errors.RedisError]] = {
    "NOPERM": redis_errors.NoPermissionError,
    "WRONGPASS": redis_errors.AuthenticationError,
    "NOAUTH": redis_errors.AuthenticationError,
    "LOADING": redis_errors.BusyLoadingError,
}


_STR_ONLY = frozenset({str})


def pack(args: tuple[str | bytes | int, ...]) -> bytes:
    """One command as a RESP array of bulk strings.

    A command of ASCII strings only (an XADD of a usage record: 27 of them) is formatted
    as one string and encoded once, in C: about 70 bytecodes instead of the general
    path's 1,040 for that XADD (which encodes and measures every argument on its own).
    """
    if args and set(map(type, args)) <= _STR_ONLY:
        strings = cast(tuple[str, ...], args)
        # One format for the whole command, filled with (length, string) pairs: no
        # Python-level loop over the arguments.
        text = ("$%d\r\n%s\r\n" * len(strings)) % tuple(
            itertools.chain.from_iterable(zip(map(len, strings), strings, strict=True))
        )
        if text.isascii():  # then len() of each string is its length in bytes
            return b"*%d\r\n%b" % (len(args), text.encode())
    return b"".join([b"*%d\r\n" % len(args), *map(bulk, args)])


# A RESP bulk string as a bytes format: its length, then its bytes.
BULK = b"$%d\r\n%b\r\n"


def bulk(arg: str | bytes | int) -> bytes:
    """One argument of a command as a RESP bulk string (UTF-8 for a str)."""
    if isinstance(arg, str):
        data = arg.encode()
    elif isinstance(arg, int):
        data = b"%d" % arg
    else:
        data = arg
    return BULK % (len(data), data)


def error_of(line: str) -> redis_errors.RedisError:
    code = line.split(" ", 1)[0]
    return _ERRORS.get(code, redis_errors.ResponseError)(line)


class _IncompleteError(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


class Parser:
    """RESP2 replies out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> bool:
        """Part of a reply is waiting for the rest of its bytes."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by ``data``, in order."""
        replies: list[Reply] = []
        if not self._buf:
            # The common case first: whole bulk strings (the entry ids a group of XADDs
            # gets back), read straight from ``data``; anything else, or a reply cut
            # short, goes to the general path below from where this one stopped.
            pos, end = 0, len(data)
            while pos < end and data[pos] == 36:  # "$"
                eol = data.find(_CRLF, pos)
                if eol < 0:
                    break
                size = int(data[pos + 1 : eol])
                stop = eol + 2 + size
                if size < 0 or stop + 2 > end:
                    break
                replies.append(data[eol + 2 : stop].decode("utf-8", "replace"))
                pos = stop + 2
            if pos == end:
                return replies
            data = data[pos:]
        self._buf += data
        pos = 0
        while pos < len(self._buf):
            try:
                reply, pos = self._one(pos)
            except _IncompleteError:
                break
            replies.append(reply)
        del self._buf[:pos]
        return replies

    def _line(self, pos: int) -> tuple[str, int]:
        end = self._buf.find(_CRLF, pos)
        if end < 0:
            raise _IncompleteError
        return self._buf[pos:end].decode("utf-8", "replace"), end + 2

    def _one(self, pos: int) -> tuple[Reply, int]:
        kind = self._buf[pos : pos + 1]
        line, after = self._line(pos + 1)
        if kind == b"+":
            return line, after
        if kind == b"-":
            return error_of(line), after
        if kind == b":":
            return int(line), after
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, after
            if len(self._buf) < after + size + 2:
                raise _IncompleteError
            return self._buf[after : after + size].decode("utf-8", "replace"), after + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, after
            items: list[Reply] = []
            for _ in range(count):
                item, after = self._one(after)
                items.append(item)
            return items, after
        raise redis_errors.InvalidResponse(f"unexpected reply type {bytes(kind)!r}")


class _Protocol(asyncio.Protocol):
    """One connection: commands made while others are on the wire go out together,
    and replies resolve them in order."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.parser = Parser()
        # Commands (or groups: `send_group`) sent and not answered yet, oldest first:
        # the future, when it expires, how many replies it still waits for.
        self.waiting: collections.deque[tuple[asyncio.Future[Reply], float, int]] = (
            collections.deque()
        )
        # Replies due for what was written, and the commands held until they are in
        # (with the replies those will get).
        self.in_flight = 0
        self.outgoing: list[bytes] = []
        self.held = 0
        self.lost: Exception | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own transports subclass asyncio.Transport; uvloop's do not (and
        # behave alike): the protocol only writes to it and closes it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        """One command: its reply's future."""
        return self._send(command, 1)

    def send_group(self, commands: list[bytes]) -> asyncio.Future[Reply]:
        """Several commands in one write (or one group held), and one future for all
        their replies: done once every one is in (its value of no use), or failed with
        the first error among them. The replies are counted, not kept; a run of stream
        entry ids (what a group of XADDs gets back) is counted in C (`_ENTRY_IDS`),
        without a reply object each."""
        return self._send(b"".join(commands), len(commands))

    def _send(self, command: bytes, replies: int) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            future.set_exception(redis_errors.ConnectionError("the connection to Redis is closed"))
            return future
        self.waiting.append((future, loop.time() + self.timeout, replies))
        if self.in_flight:
            # The group commit: while commands are on the wire, the next ones wait and
            # leave together when the last reply is in.
            self.outgoing.append(command)
            self.held += replies
        else:
            self.in_flight = replies
            self.transport.write(command)
        if self._timer is None:
            self._timer = loop.call_later(self.timeout, self._check_deadline)
        return future

    def _check_deadline(self) -> None:
        self._timer = None
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        late = self.waiting[0][1] - loop.time()
        if late <= 0:
            self._fail(redis_errors.TimeoutError(f"Redis did not answer within {self.timeout}s"))
        else:
            self._timer = loop.call_later(late, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        waiting = self.waiting
        answered = 0
        if waiting and waiting[0][2] > 1 and not self.parser.buffered:
            # A group at the head: count its run of entry ids without parsing them.
            run = _ENTRY_IDS.match(data)
            end = run.end() if run is not None else 0
            counted = data.count(_CRLF, 0, end) >> 1
            future, deadline, left = waiting[0]
            if 0 < counted <= left:
                answered = counted
                if counted == left:
                    waiting.popleft()
                    if not future.done():
                        future.set_result(None)
                else:
                    waiting[0] = (future, deadline, left - counted)
                data = data[end:]
            # else: none, or replies past the group's too: each read one by one below
        try:
            replies = self.parser.feed(data) if data else []
        except (redis_errors.InvalidResponse, ValueError) as exc:
            self._fail(
                redis_errors.InvalidResponse(f"Redis sent a reply this client cannot read ({exc})")
            )
            return
        for reply in replies:
            if not waiting:
                self._fail(redis_errors.InvalidResponse("Redis sent a reply nobody asked for"))
                return
            future, deadline, left = waiting[0]
            if left > 1:
                waiting[0] = (future, deadline, left - 1)
            else:
                waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, redis_errors.RedisError):
                future.set_exception(reply)
            elif left == 1:
                future.set_result(reply)
        self.in_flight -= answered + len(replies)
        if not self.in_flight and self.outgoing and self.transport is not None:
            self.in_flight, self.held = self.held, 0
            self.transport.write(b"".join(self.outgoing))
            self.outgoing.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            redis_errors.ConnectionError(
                "the connection to Redis was lost"
                + (f" ({type(exc).__name__})" if exc is not None else "")
            ),
            close=False,
        )

    def _fail(self, error: Exception, *, close: bool = True) -> None:
        if self.lost is None:
            self.lost = error
        self.outgoing.clear()
        self.in_flight = self.held = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if close and self.transport is not None:
            self.transport.abort()


class Client:
    """A connection to one Redis as one user; `execute_command` as in redis-py."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        tls: ssl.SSLContext | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.db = db
        self.tls = tls
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> Client:
        """``redis://host:port/db`` or ``rediss://`` (TLS, verified with ``ca_cert``)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"a Redis URL starts with redis:// or rediss://, not {parts.scheme}://"
            )
        tls: ssl.SSLContext | None = None
        if parts.scheme == "rediss":
            tls = (
                ssl.create_default_context(cadata=ca_cert)
                if ca_cert
                else ssl.create_default_context()
            )
        path = parts.path.lstrip("/")
        return cls(
            parts.hostname or "localhost",
            parts.port or 6379,
            username=username
            if username is not None
            else (urllib.parse.unquote(parts.username) if parts.username else None),
            password=password
            if password is not None
            else (urllib.parse.unquote(parts.password) if parts.password else None),
            db=int(path) if path else 0,
            tls=tls,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self.timeout),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except TimeoutError:
            raise redis_errors.TimeoutError(
                f"no connection to Redis at {self.host}:{self.port} within {self.connect_timeout}s"
            ) from None
        except OSError as exc:
            raise redis_errors.ConnectionError(
                f"no connection to Redis at {self.host}:{self.port} ({type(exc).__name__})"
            ) from None
        handshake: list[asyncio.Future[Reply]] = []
        if self._password is not None:
            auth = (
                ("AUTH", self.username, self._password)
                if self.username
                else ("AUTH", self._password)
            )
            handshake.append(protocol.send(pack(auth)))
        if self.db:
            handshake.append(protocol.send(pack(("SELECT", self.db))))
        try:
            for reply in await asyncio.gather(*handshake):
                if isinstance(reply, redis_errors.RedisError):
                    raise reply
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
        return protocol

    async def _connection(self) -> _Protocol:
        if self._closed:
            raise redis_errors.ConnectionError("this Redis client is closed")
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            protocol = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._protocol = protocol
        return protocol

    def execute_command(self, *args: str | bytes | int) -> Awaitable[Reply]:
        """Send one command; its reply, or the error Redis answered raised, when awaited.

        Connected, the command is on the wire (or queued for the next group) when this
        returns, before it is awaited: a caller can do other work while Redis answers.
        Otherwise it is sent once awaited, after the connection is made.
        """
        return self.execute_packed(pack(args))

    def execute_packed(self, command: bytes) -> Awaitable[Reply]:
        """`execute_command` of a command already packed (`pack`, or bytes built the same
        way): what a caller that sends the same kind of command on every request uses to
        build it faster than `pack` can."""
        protocol = self._protocol
        if not self._closed and protocol is not None and protocol.lost is None:
            return protocol.send(command)
        return self._connect_and_send(command)

    async def execute_many(self, commands: list[bytes]) -> None:
        """Send packed commands in one write and wait for all their replies; raises
        the first error among them (a command Redis refused, or the connection lost).
        Replies are not kept: for commands whose success is all that matters (the
        spool's XADDs, `spool.Spool`), one future for all (`_Protocol.send_group`)."""
        if not commands:
            return
        protocol = await self._connection()
        await protocol.send_group(commands)

    async def _connect_and_send(self, command: bytes) -> Reply:
        protocol = await self._connection()
        return await protocol.send(command)

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
