"""The usage spool (`bmad_integrations.usage.spool`) with a shipper that stands in for
Redis (a unit test; the real Redis and a killed runtime process are in
tests/integration/usage/test_usage_spool_process.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import resource
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors

from bmad_integrations.usage import record, spool, writer

pytestmark = pytest.mark.unit

KEY = record.stream_key("acme", "analyst")


class FakeRedis:
    """Acknowledges (or refuses, while ``down``) every command, in the order sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.groups = 0
        self.down = False

    def execute_packed(self, command: bytes) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if self.down:
            reply.set_exception(redis_errors.ConnectionError("down"))
        else:
            self.received.append(command)
            reply.set_result(b"1-1")
        return reply

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        return self.execute_packed(b"")

    async def execute_many(self, commands: list[bytes]) -> None:
        self.groups += 1
        if self.down:
            raise redis_errors.ConnectionError("down")
        self.received.extend(commands)

    async def aclose(self) -> None:
        return None


def command(n: int) -> bytes:
    return b"*3\r\n$4\r\nXADD\r\n$%d\r\n%b\r\n$%d\r\nrecord-%d\r\n" % (
        len(KEY),
        KEY.encode(),
        len(b"record-%d" % n),
        n,
    )


def opened(folder: Path, redis: FakeRedis, **kw: Any) -> spool.Spool:
    kw.setdefault("interval", 0.001)
    return spool.Spool(folder, redis, key=KEY, **kw)


def crash(kept: spool.Spool) -> None:
    """What a SIGKILL leaves: the files as they are, the lock released (by the kernel)."""
    kept._closed = True
    if kept._timer is not None:
        kept._timer.cancel()
    kept._release()


async def shipped(kept: spool.Spool) -> None:
    """Until everything kept is acknowledged (by the spool's own timer)."""
    for _ in range(5000):
        if not kept.pending:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{kept.pending} records still not shipped")


async def test_records_are_shipped_in_one_group_after_the_interval(tmp_path: Path) -> None:
    redis = FakeRedis()
    kept = opened(tmp_path, redis, interval=0.05)
    for n in range(5):
        kept.append(command(n))
    assert redis.received == []  # nothing sent with the answer
    assert kept.pending == 5
    await shipped(kept)
    assert redis.received == [command(n) for n in range(5)]
    assert redis.groups == 1
    assert kept.shipped_records == 5
    await kept.aclose()


async def test_a_killed_process_leaves_its_unshipped_records_to_the_next(tmp_path: Path) -> None:
    redis = FakeRedis()
    first = opened(tmp_path, redis)
    for n in range(3):
        first.append(command(n))
    await shipped(first)
    redis.down = True
    for n in range(3, 10):
        first.append(command(n))
    await asyncio.sleep(0.01)  # shipping fails: kept
    crash(first)

    redis.down = False
    second = opened(tmp_path, redis)
    assert second.recovered == 7  # the shipped three are not read again
    second.start()
    await shipped(second)
    assert redis.received == [command(n) for n in range(10)]
    await second.aclose()

    third = opened(tmp_path, redis)
    assert third.recovered == 0  # everything was marked shipped
    await third.aclose()


async def test_a_frame_cut_short_by_the_kill_is_not_read(tmp_path: Path) -> None:
    redis = FakeRedis()
    redis.down = True
    first = opened(tmp_path, redis)
    for n in range(3):
        first.append(command(n))
    # The kill lands while the fourth is copied: its command is in, its head is not.
    segment = first.current
    body = command(3)
    start = segment.end + spool.FRAME_BYTES
    segment.map[start : start + len(body)] = body
    crash(first)

    second = opened(tmp_path, FakeRedis())
    assert second.recovered == 3
    assert second.current.end == segment.end  # the next record goes where the cut one was
    await second.aclose()


async def test_a_frame_whose_command_does_not_match_its_checksum_ends_the_reading(
    tmp_path: Path,
) -> None:
    redis = FakeRedis()
    redis.down = True
    first = opened(tmp_path, redis)
    for n in range(4):
        first.append(command(n))
    segment = first.current
    second_frame = spool.HEADER_BYTES + spool.FRAME_BYTES + len(command(0))
    segment.map[second_frame + spool.FRAME_BYTES] ^= 0xFF  # one byte of record 1 changed
    crash(first)
    again = opened(tmp_path, FakeRedis())
    assert again.recovered == 1
    await again.aclose()


async def test_segments_rotate_and_frames_of_an_older_generation_are_never_read(
    tmp_path: Path,
) -> None:
    redis = FakeRedis()
    size = 4096
    kept = opened(tmp_path, redis, segment_bytes=size, rotate_bytes=1024)
    for n in range(200):  # about ten times what one segment holds
        kept.append(command(n))
        if n % 10 == 9:
            await shipped(kept)
    await shipped(kept)
    generations = [s.generation for s in kept.segments]
    assert max(generations) > 5, generations
    redis.down = True
    kept.append(command(200))
    crash(kept)

    again = opened(tmp_path, FakeRedis(), segment_bytes=size, rotate_bytes=1024)
    # Both segments are full of older frames; only the one unshipped record is read.
    assert again.recovered == 1
    assert again.segments[0].unshipped + again.segments[1].unshipped == [command(200)]
    await again.aclose()
    assert redis.received == [command(n) for n in range(200)]


async def test_a_full_spool_refuses_the_record_and_the_writer_refuses_the_answer(
    tmp_path: Path,
) -> None:
    redis = FakeRedis()
    redis.down = True
    kept = opened(tmp_path, redis, segment_bytes=2048, rotate_bytes=512)
    client = spool.SpoolingClient(redis, kept)
    ledger = writer.LedgerWriter(
        client, namespace="acme", agent="analyst", attempts=2, backoff=0.001
    )

    def call(n: int) -> Any:
        return ledger.append(
            tenant="acme",
            record_id=record.request_record_id(f"req-{n}"),
            provider="echo",
            model="echo-1",
            tokens_in=1,
            tokens_out=2,
            occurred_at=dt.datetime.now(dt.UTC),
            source="http",
            conversation=None,
        )

    answered = 0
    refused: writer.LedgerUnavailable | None = None
    for n in range(100):
        try:
            assert await call(n) == spool.SPOOLED
        except writer.LedgerUnavailable as exc:
            refused = exc
            break
        answered += 1
    assert refused is not None
    assert "unreachable after 2 attempts (SpoolFull)" in str(refused)
    assert 0 < answered < 100
    assert kept.pending == answered  # every answered call is kept, the refused one is not

    redis.down = False
    assert await kept.drain(5) == 0
    assert len(redis.received) == answered
    assert await call(1000) == spool.SPOOLED  # room again
    await client.aclose()


async def test_records_sent_while_redis_is_down_are_sent_again_in_order(tmp_path: Path) -> None:
    redis = FakeRedis()
    redis.down = True
    kept = opened(tmp_path, redis)
    kept.append(command(0))
    kept.append(command(1))
    await asyncio.sleep(0.02)
    kept.append(command(2))
    redis.down = False
    await shipped(kept)
    assert redis.received == [command(0), command(1), command(2)]
    await kept.aclose()


async def test_aclose_ships_what_is_left_and_says_how_many_it_could_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis = FakeRedis()
    kept = opened(tmp_path, redis, interval=60)
    kept.append(command(0))
    await kept.aclose()
    assert redis.received == [command(0)]

    redis.down = True
    kept = opened(tmp_path, redis, interval=60)
    kept.append(command(1))
    await kept.aclose(0.05)
    assert "1 usage records could not be shipped" in caplog.text
    redis.down = False
    again = opened(tmp_path, redis)
    assert again.recovered == 1
    await again.aclose()
    assert redis.received == [command(0), command(1)]


def test_one_process_per_directory(tmp_path: Path) -> None:
    kept = opened(tmp_path, FakeRedis())
    with pytest.raises(spool.SpoolError, match="another process holds the usage spool"):
        opened(tmp_path, FakeRedis())
    kept._release()


async def test_a_spool_of_another_agent_is_refused(tmp_path: Path) -> None:
    redis = FakeRedis()
    redis.down = True
    kept = opened(tmp_path, redis)
    kept.append(command(0))
    crash(kept)
    with pytest.raises(spool.SpoolError, match=r"not of 'bmad:usage:.*give each agent"):
        spool.Spool(tmp_path, redis, key=record.stream_key("acme", "other"))


def test_frame_layout() -> None:
    """The head is length, generation and CRC-32, little-endian, 12 bytes."""
    assert spool.FRAME_BYTES == struct.calcsize("<III") == 12


def test_a_directory_that_cannot_be_written_is_a_spool_error_saying_so(tmp_path: Path) -> None:
    """The runtime falls back to waiting for Redis on a SpoolError (not a crash)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(spool.SpoolError, match=r"cannot be used .*mount a writable directory"):
        spool.Spool(blocker / "spool", FakeRedis(), key=KEY)


async def test_records_before_the_rotation_mark_take_no_page_fault(tmp_path: Path) -> None:
    # The part of both segments records go to before a rotation is mapped in when the
    # spool opens (`Segment.touch`), not by the first record on each page, on an
    # answer's path; the records a previous process left are read first, unchanged.
    redis = FakeRedis()
    first = opened(tmp_path, redis, segment_bytes=4 << 20, rotate_bytes=2 << 20)
    redis.down = True
    for n in range(3):
        first.append(command(n))
    crash(first)
    redis.down = False
    kept = opened(tmp_path, redis, segment_bytes=4 << 20, rotate_bytes=2 << 20, interval=60)
    assert kept.recovered == 3
    one = command(7) * 8  # about 500 bytes: 8 records a page
    records = (1 << 20) // len(one)  # half the mark: about 256 pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(records):
        kept.append(one)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 40, f"{faults} page faults for {records} records"
    await kept.aclose()
    assert redis.received == [command(n) for n in range(3)] + [one] * records
