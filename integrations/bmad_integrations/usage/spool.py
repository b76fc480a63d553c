"""The runtime's usage spool: each record kept in a file of the pod's before the answer
leaves, shipped to the platform Redis in the background (docs/billing.md, The ledger).

Why: the ledger's XADD, awaited on every answer, cost a request with the in-process
store 7-30 % of its throughput on this project's test machine (docs/benchmarks.md), a
round trip to Redis and a sleep and wake of the runtime's thread each time. Copying
the record into a memory-mapped file costs no system call and no wait; the kernel keeps
the pages when the process is killed, and a runtime that starts on the same directory
(the container restarted in its pod, whose ``emptyDir`` outlives it) ships what its
predecessor left. The guarantee is therefore "no answer without a record in the pod's
spool"; a record reaches the ledger's stream within ``interval`` of the answer while
Redis is up. What the spool does not survive: the loss of the pod's ``emptyDir`` with
records still in it (a node lost, or a pod removed while the platform Redis was down
for its whole grace period: the runtime ships what it can when it stops, and logs how
many it could not).

The spool is two segment files (``segment-0``, ``segment-1``) and a lock file in its
directory. A segment is a header (magic, generation, how far it has been shipped, the
stream it belongs to) and frames: the length, the generation and a CRC-32 of the
command, then the command (the XADD `writer.LedgerWriter` made, byte for byte). A
frame's command is copied first and its head last, so a process killed in the middle
leaves a frame whose head does not check, where reading stops. Records are appended to
the current segment; past ``rotate_bytes`` the spool moves to the other segment once
everything in it is shipped, and starts it afresh under a new generation (frames left
from an older one are not read). Shipping sends every command not yet shipped in one
pipelined group, and marks the segment shipped up to where the group ended once Redis
has acknowledged all of it. A group cut short is sent again: a record appended twice is
one record in the ledger (its id is the ledger's key, `record`).

A spool whose segments are both full (the platform Redis unreachable for long) refuses
new records: the writer retries and then the answer is refused, as without a spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import struct
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from redis import exceptions as redis_errors

log = logging.getLogger(__name__)

MAGIC = b"BMADSPL1"
HEADER_BYTES = 512
# magic, generation, shipped offset, length of the stream key (the key follows).
_HEADER = struct.Struct("<8sQQH")
_KEY_MAX = HEADER_BYTES - _HEADER.size
# length of the command, generation (low 32 bits), CRC-32 of the command.
_FRAME = struct.Struct("<III")
FRAME_BYTES = _FRAME.size

DEFAULT_SEGMENT_BYTES = 32 << 20
DEFAULT_ROTATE_BYTES = 4 << 20
DEFAULT_INTERVAL = 0.02  # s between an append and its shipping
DEFAULT_DRAIN_SECONDS = 10.0
_BACKOFF_MAX = 2.0

SPOOLED = "spooled"
"""What a write through the spool gives back instead of a stream entry id."""


class SpoolError(Exception):
    """The spool's directory cannot be used (another process has it, or it is of
    another agent); the message says which and what to change."""


class SpoolFull(OSError):  # noqa: N818 - the name says what the writer meets
    """Both segments hold records not yet shipped: the platform Redis has been
    unreachable too long for another record to be kept."""


class Shipper(Protocol):
    """What the spool ships with: `resp.Client`'s ``execute_many``."""

    def execute_many(self, commands: list[bytes]) -> Awaitable[None]: ...


class Segment:
    """One memory-mapped segment file."""

    def __init__(self, path: Path, size: int, key: bytes) -> None:
        self.path = path
        self.key = key
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            found = os.fstat(fd).st_size
            if found != size:
                # A smaller file is grown (its frames kept); a larger one keeps its size.
                size = max(size, found)
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        # Where a frame's head may start at the latest for a command of length n: n less.
        self.last_head = size - FRAME_BYTES
        self.generation = 0
        self.generation32 = 0  # the generation as frames carry it (its low 32 bits)
        self.shipped = HEADER_BYTES
        self.end = HEADER_BYTES
        self.unshipped: list[bytes] = []
        self.in_flight = False

    def recover(self) -> int:
        """Read what a previous process left: the frames after the shipped mark, now
        this segment's unshipped records. Returns how many."""
        magic, generation, shipped, key_len = _HEADER.unpack_from(self.map, 0)
        if magic != MAGIC:
            self.reset(generation=1)
            return 0
        key = bytes(self.map[_HEADER.size : _HEADER.size + key_len])
        if key != self.key:
            raise SpoolError(
                f"{self.path} holds the usage records of the stream "
                f"{key.decode(errors='replace')!r}, not of {self.key.decode()!r}: give each "
                "agent a spool directory of its own"
            )
        self.generation = generation
        self.generation32 = gen = generation & 0xFFFFFFFF
        self.shipped = self.end = max(HEADER_BYTES, min(shipped, self.size))
        pos = self.end
        while pos + FRAME_BYTES <= self.size:
            length, frame_gen, crc = _FRAME.unpack_from(self.map, pos)
            start = pos + FRAME_BYTES
            if frame_gen != gen or length == 0 or start + length > self.size:
                break
            command = bytes(self.map[start : start + length])
            if zlib.crc32(command) != crc:
                break
            self.unshipped.append(command)
            pos = start + length
        self.end = pos
        return len(self.unshipped)

    def touch(self, upto: int) -> None:
        """Map the pages before ``upto`` in now (each page's first byte written with
        itself: no content changes): otherwise the first record on each page pays the
        page fault of a page of memory allocated for the file, on the answer's path."""
        pages = self.map
        for offset in range(0, min(upto, self.size), mmap.PAGESIZE):
            pages[offset] = pages[offset]

    def reset(self, *, generation: int) -> None:
        """Start afresh (everything in it shipped): frames left are of an older
        generation and never read again."""
        self.generation = generation
        self.generation32 = generation & 0xFFFFFFFF
        self.shipped = self.end = HEADER_BYTES
        self.unshipped = []
        _HEADER.pack_into(self.map, 0, MAGIC, generation, HEADER_BYTES, len(self.key))
        self.map[_HEADER.size : _HEADER.size + len(self.key)] = self.key

    def mark_shipped(self, upto: int) -> None:
        self.shipped = upto
        struct.pack_into("<Q", self.map, 16, upto)

    @property
    def done(self) -> bool:
        """Everything appended has been shipped and acknowledged."""
        return not self.in_flight and not self.unshipped and self.shipped == self.end

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()


class Spool:
    """An agent's usage spool in ``directory`` (created if missing), shipped over
    ``shipper`` (the ledger writer's Redis client).

    `append` is called on the event loop, once per record, before the answer leaves:
    it copies the command into the current segment and arranges for it to be shipped
    within ``interval``. Opening the spool takes its directory's lock (one process per
    directory) and reads what a previous process left unshipped; that is shipped as
    soon as an event loop runs (`start`, or the first `append`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        shipper: Shipper,
        *,
        key: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if rotate_bytes > segment_bytes - HEADER_BYTES:
            raise ValueError("rotate_bytes must leave room in a segment")
        key_b = key.encode()
        if len(key_b) > _KEY_MAX:
            raise ValueError(f"a stream key of at most {_KEY_MAX} bytes, not {len(key_b)}")
        self.directory = Path(directory)
        self.shipper = shipper
        self.rotate_bytes = rotate_bytes
        self._rotate_at = HEADER_BYTES + rotate_bytes
        self.interval = interval
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(
                f"the usage spool at {self.directory} cannot be used ({type(exc).__name__}: "
                f"{exc.strerror}): mount a writable directory there"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(
                f"another process holds the usage spool at {self.directory}: give each "
                "runtime process a spool directory of its own"
            ) from None
        self.segments: list[Segment] = []
        try:
            for index in (0, 1):
                self.segments.append(
                    Segment(self.directory / f"segment-{index}", segment_bytes, key_b)
                )
            self.recovered = sum(segment.recover() for segment in self.segments)
            # The part of both segments records go to before a rotation (and the page
            # a record that crosses the mark may reach): faulted in once, here.
            for segment in self.segments:
                segment.touch(self._rotate_at + mmap.PAGESIZE)
        except OSError as exc:
            self._release()
            raise SpoolError(
                f"the usage spool at {self.directory} cannot be used ({type(exc).__name__}: "
                f"{exc.strerror}): mount a writable directory there"
            ) from None
        except BaseException:
            self._release()
            raise
        # Append to the segment with frames not yet shipped, the one with the newer
        # generation if both have (it was the current one), then carry on there.
        self.current = max(self.segments, key=lambda s: (s.end > HEADER_BYTES, s.generation))
        self._generation = max(s.generation for s in self.segments)
        self.shipped_records = 0
        self._in_flight_records = 0
        self._timer: asyncio.TimerHandle | None = None
        self._shipping: asyncio.Task[None] | None = None
        self._delay = interval
        self._failing = False
        self._closed = False
        if self.recovered:
            log.info(
                "the usage spool at %s holds %d records a previous process did not ship: "
                "shipping them",
                self.directory,
                self.recovered,
            )

    @property
    def pending(self) -> int:
        """Records kept and not yet acknowledged by Redis (sent or not)."""
        return sum(len(s.unshipped) for s in self.segments) + self._in_flight_records

    def start(self) -> None:
        """Ship what a previous process left (on the running event loop)."""
        if any(s.unshipped for s in self.segments):
            self._schedule(0.0)

    def append(self, command: bytes) -> None:
        """Keep one record's command; raises `SpoolFull` when there is no room.

        The command is copied into the current segment first and its frame's head
        written last (see the module); shipping is arranged if none is (which also
        ships what a previous process left)."""
        current = self.current
        length = len(command)
        head = current.end
        if head >= self._rotate_at or head + length > current.last_head:
            current = self._rotate(length)
            head = current.end
        start = head + FRAME_BYTES
        current.map[start : start + length] = command
        _FRAME.pack_into(current.map, head, length, current.generation32, zlib.crc32(command))
        current.end = start + length
        current.unshipped.append(command)
        if self._timer is None and self._shipping is None:
            self._schedule(self._delay)

    def _rotate(self, length: int) -> Segment:
        other = self.segments[1] if self.current is self.segments[0] else self.segments[0]
        if other.done:
            self._generation += 1
            other.reset(generation=self._generation)
            self.current = other
            return other
        if self.current.end + length <= self.current.last_head:
            return self.current  # past the mark, but the other is not shipped yet
        raise SpoolFull(
            f"the usage spool at {self.directory} is full: {self.pending} records wait "
            "for the platform Redis"
        )

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._ship)

    def _ship(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._shipping = asyncio.ensure_future(self._ship_once())
        self._shipping.add_done_callback(self._shipped)

    def _shipped(self, task: asyncio.Task[None]) -> None:
        self._shipping = None
        if task.cancelled() or self._closed:
            return
        failed = task.exception()
        if failed is None:
            if self._failing:
                log.info("the usage spool ships to the platform Redis again")
            self._failing = False
            self._delay = self.interval
        else:
            if not self._failing:
                log.warning(
                    "usage records cannot be shipped to the platform Redis (%s): kept in "
                    "the spool at %s, retrying",
                    _describe(failed),
                    self.directory,
                )
            self._failing = True
            self._delay = min(max(self._delay * 2, 0.05), _BACKOFF_MAX)
        if any(s.unshipped for s in self.segments):
            self._schedule(self._delay)

    async def _ship_once(self) -> None:
        """Send every unshipped command in one group; mark each segment shipped up to
        where its part ended once all of them are acknowledged."""
        parts: list[tuple[Segment, int, list[bytes]]] = []
        commands: list[bytes] = []
        for segment in self.segments:
            if not segment.unshipped:
                continue
            batch, segment.unshipped = segment.unshipped, []
            segment.in_flight = True
            parts.append((segment, segment.end, batch))
            commands += batch
        self._in_flight_records += len(commands)
        try:
            await self.shipper.execute_many(commands)
        except BaseException:
            # Not acknowledged: back in front of what came since, sent again later.
            for segment, _, batch in parts:
                segment.unshipped[:0] = batch
            raise
        else:
            for segment, upto, _ in parts:
                segment.mark_shipped(upto)
            self.shipped_records += len(commands)
        finally:
            self._in_flight_records -= len(commands)
            for segment, _, _ in parts:
                segment.in_flight = False

    async def drain(self, seconds: float = DEFAULT_DRAIN_SECONDS) -> int:
        """Ship everything kept, within ``seconds``; the records left (0 when all are
        shipped)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        delay = 0.05
        while True:
            if self._shipping is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        asyncio.shield(self._shipping), max(0.0, deadline - loop.time())
                    )
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not any(s.unshipped for s in self.segments) or loop.time() >= deadline:
                break
            try:
                await asyncio.wait_for(self._ship_once(), max(0.0, deadline - loop.time()))
            except Exception:  # retried until the deadline, then counted
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, _BACKOFF_MAX)
        return self.pending

    async def aclose(self, seconds: float = DEFAULT_DRAIN_SECONDS) -> None:
        """Drain (see `drain`), then release the directory. Records that could not be
        shipped stay in the files for the next process on this directory."""
        left = await self.drain(seconds)
        self._closed = True
        if left:
            log.error(
                "%d usage records could not be shipped to the platform Redis before the "
                "runtime stopped: they stay in %s and are shipped by the next runtime "
                "started on it (lost if the pod's volume is removed first)",
                left,
                self.directory,
            )
        self._release()

    def _release(self) -> None:
        for segment in self.segments:
            segment.close()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)


def _describe(exc: BaseException) -> str:
    """An error's class (and Redis's error code): never its whole text, which for a
    connection may carry an address but never a secret; kept short either way."""
    if isinstance(exc, redis_errors.ResponseError):
        return f"{type(exc).__name__}: {str(exc).split(' ', 1)[0]}"
    return type(exc).__name__


class SpoolingClient:
    """A ledger writer's client (`writer.Commands`) that keeps each XADD in a `Spool`
    and ships it over ``client``: `execute_packed` (the records) answers at once;
    `execute_command` (the budget key's GET, PING) goes to ``client``."""

    def __init__(self, client: Any, spool: Spool) -> None:
        self.client = client
        self.spool = spool
        # Keep one command (raises `SpoolFull`): the writer's way. The first append
        # ships what a previous process left too, if no loop ran `start` before.
        self.keep: Callable[[bytes], None] = spool.append
        with contextlib.suppress(RuntimeError):  # no loop yet: shipped on first use
            asyncio.get_running_loop()
            spool.start()

    def execute_packed(self, command: bytes) -> Awaitable[Any]:
        """`keep` as a reply: `SPOOLED`, or `SpoolFull` raised when awaited."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self.keep(command)
        except SpoolFull as exc:
            done.set_exception(exc)
        else:
            done.set_result(SPOOLED)
        return done

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        result: Awaitable[Any] = self.client.execute_command(*args)
        return result

    def execute_many(self, commands: list[bytes]) -> Awaitable[None]:
        result: Awaitable[None] = self.client.execute_many(commands)
        return result

    async def aclose(self) -> None:
        try:
            await self.spool.aclose()
        finally:
            await self.client.aclose()
