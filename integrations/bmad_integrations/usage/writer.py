"""The runtime's side of the ledger: one XADD per model call on its own stream.

The writer authenticates as the agent's ACL user (see `acl`), which may append to one
stream only. It appends before the answer leaves the runtime, so every answer a
caller received has a record. A replica killed between the model's answer and this
write leaves no record, but also no answer: a bus task is then redelivered and its
record id (from the task id) makes the replay one record; an HTTP caller that retries
with the same ``X-Request-Id`` likewise.

Connection failures are retried a few times with backoff; then `LedgerUnavailable` is
raised and the caller fails the turn rather than answer without a record. An XADD
retried after a lost reply may append the same record twice: the ledger's key makes
the second one a no-op.

With a spool (`from_url`'s ``spool_dir``, the runtime's ``BMAD_USAGE_LEDGER_SPOOL``,
which the operator sets) the record is kept in the pod's spool file before the answer
leaves and shipped to the stream in the background (`spool`): the answer waits for no
reply from Redis, and a replica killed after answering leaves the record in the spool
for the next process on it. Without one, every answer waits for Redis to acknowledge
its XADD.

`from_url` talks to Redis with the ledger's own small pipelined client (`resp`): the
XADD is on every answer's path, and redis-py's asyncio client cost about three times
as much CPU per XADD there (see `resp`). A writer also takes any client with redis-py's
``execute_command`` (the tests hand it a redis-py one).

The runtime calls `LedgerWriter.append` with a call's fields rather than `write` with a
`record.UsageRecord` (which `write` hands to `append`): the same checks
(`record.check`) and the XADD of `record.encode`'s fields, byte for byte
(`tests/unit/usage/test_usage_writer_append.py`), filled into one bytes format per
kind of record (tenant, provider, model and source: `_template`) instead of a record, a
map of its fields and a command packed by `resp.pack`: a third to a half of the CPU of
that way (`bench/ledger_record.py`, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from redis import exceptions as redis_errors

from bmad_integrations.usage import record, resp, spool

log = logging.getLogger(__name__)

_RETRYABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    ConnectionError,
    TimeoutError,
    OSError,
)


class LedgerUnavailable(Exception):  # noqa: N818 - the name says what the caller meets
    """The usage record could not be written; the turn must not be answered."""


class Commands(Protocol):
    """What a writer needs of a Redis client (redis-py's and `resp.Client` both)."""

    def execute_command(self, *args: Any) -> Awaitable[Any]: ...

    async def aclose(self) -> None: ...


class LedgerWriter:
    """Appends one agent's usage records to its stream on the platform Redis."""

    def __init__(
        self,
        client: Commands,
        *,
        namespace: str,
        agent: str,
        attempts: int = 4,
        backoff: float = 0.05,
        backoff_max: float = 1.0,
        owns_client: bool = False,
        unavailable: type[LedgerUnavailable] = LedgerUnavailable,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.client = client
        self.namespace = namespace
        self.agent = agent
        self.key = record.stream_key(namespace, agent)
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._owns_client = owns_client
        # What a record that cannot be written raises: a caller may pass a subclass that
        # is its own error type too, and catch that without wrapping every write.
        self.unavailable = unavailable
        # `resp.Client` takes a command packed already; redis-py's client does not.
        self._packed: Callable[[bytes], Awaitable[Any]] | None = getattr(
            client, "execute_packed", None
        )
        # `spool.SpoolingClient` keeps a command at once, with no reply to wait for.
        self._keep: Callable[[bytes], None] | None = getattr(client, "keep", None)
        self._kept: asyncio.Future[str] | None = None
        # The command's bytes format per kind of record (`_template`).
        self._templates: dict[tuple[str, str, str, str, bool], bytes] = {}
        # The last second a record's time fell in, and that second in ISO 8601 (`append`).
        self._second: tuple[int, ...] = ()
        self._second_iso = b""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str,
        password: str,
        namespace: str,
        agent: str,
        ca_cert: str | None = None,
        timeout: float = 2.0,
        attempts: int = 4,
        spool_dir: str | None = None,
    ) -> LedgerWriter:
        """A writer with its own client (closed by `aclose`); ``url`` has no password.

        With ``spool_dir`` each record is kept in a `spool.Spool` there and shipped in
        the background (`spool.SpoolingClient`) instead of awaited from Redis."""
        client = resp.Client.from_url(
            url,
            username=username,
            password=password,
            ca_cert=ca_cert,
            timeout=timeout,
            connect_timeout=timeout,
        )
        commands: Commands = client
        if spool_dir is not None:
            kept = spool.Spool(spool_dir, client, key=record.stream_key(namespace, agent))
            commands = spool.SpoolingClient(client, kept)
        return cls(commands, namespace=namespace, agent=agent, attempts=attempts, owns_client=True)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    def write(self, rec: record.UsageRecord) -> Awaitable[str]:
        """Append the record: await the result for its stream entry id. Raises
        `LedgerUnavailable` (and `record.RecordError` for a record of another stream).

        The first attempt is made when this is called: with `resp.Client` on a live
        connection the XADD is on the wire before the caller awaits, so the caller can
        get on with work that does not depend on the record (and must await before it
        lets the answer go).
        """
        if (rec.namespace, rec.agent) != (self.namespace, self.agent):
            raise record.RecordError(
                "WrongStream",
                f"a record of {rec.namespace}/{rec.agent} cannot go to the stream of "
                f"{self.namespace}/{self.agent}",
            )
        return self.append(
            tenant=rec.tenant,
            record_id=rec.record_id,
            provider=rec.provider,
            model=rec.model,
            tokens_in=rec.tokens_in,
            tokens_out=rec.tokens_out,
            occurred_at=rec.occurred_at,
            source=rec.source,
            conversation=rec.conversation,
        )

    def append(
        self,
        *,
        tenant: str,
        record_id: str,
        provider: str,
        model: str,
        tokens_in: int,
        tokens_out: int,
        occurred_at: dt.datetime,
        source: record.Source,
        conversation: str | None,
    ) -> Awaitable[str]:
        """`write` of the record these fields make, without making it: the same checks
        (`record.check` the first time a kind of record comes, then only the fields that
        change from call to call, `record.call_fields_pass`; `record.RecordError` raised
        now) and the XADD of the record's fields (`record.encode`), byte for byte what
        `resp.pack` makes of it (`tests/unit/usage/test_usage_writer_append.py`). A model
        call's record is on every answer's path: this fills one bytes format with the
        fields (`_template`) instead of making a `record.UsageRecord`, a map of its
        fields and the command, and packing it. A client without ``execute_packed``
        (redis-py's) is given the command's arguments."""
        shape = (tenant, provider, model, source, conversation is not None)
        try:
            template = self._templates.get(shape)
        except TypeError:  # a name that cannot be hashed: refused by the check below
            template = None
        # A format is made only for names that passed `record.check`: with one, the
        # fields that change from call to call are all that is left to test.
        if template is None or not record.call_fields_pass(
            record_id, tokens_in, tokens_out, conversation
        ):
            record.check(
                record_id=record_id,
                tenant=tenant,
                namespace=self.namespace,
                agent=self.agent,
                provider=provider,
                model=model,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                source=source,
                conversation=conversation,
            )
            if template is None:
                if len(self._templates) >= _TEMPLATES_MAX:
                    self._templates.clear()
                template = self._templates[shape] = self._template(*shape)
        if occurred_at.tzinfo is not dt.UTC:
            occurred_at = record.utc(occurred_at)
        ident = record_id.encode()  # printable ASCII (checked)
        tokens_in_b = b"%d" % tokens_in
        tokens_out_b = b"%d" % tokens_out
        # ``occurred_at.isoformat()``, byte for byte, with the second's part formatted
        # once per second (`tests/unit/usage/test_usage_writer_append.py`).
        second = (
            occurred_at.second,
            occurred_at.minute,
            occurred_at.hour,
            occurred_at.day,
            occurred_at.month,
            occurred_at.year,
        )
        if second != self._second:
            self._second = second
            self._second_iso = b"%04d-%02d-%02dT%02d:%02d:%02d" % second[::-1]
        micro = occurred_at.microsecond
        at = self._second_iso + (b".%06d+00:00" % micro if micro else b"+00:00")
        values = (
            len(ident),
            ident,
            len(tokens_in_b),
            tokens_in_b,
            len(tokens_out_b),
            tokens_out_b,
            len(at),
            at,
        )
        if conversation is None:
            command = template % values
        else:
            conv = conversation.encode()
            command = template % (*values, len(conv), conv)
        keep = self._keep
        if keep is not None:
            # A spool: kept now (the answer may leave once it is), or full (retried).
            try:
                keep(command)
            except spool.SpoolFull:
                pass
            else:
                kept = self._kept
                if kept is None:
                    # One future, done, for every record kept: awaiting a done future
                    # gives its result at once, on whatever loop awaits it.
                    kept = self._kept = asyncio.get_running_loop().create_future()
                    kept.set_result(spool.SPOOLED)
                return kept
        packed = self._packed
        if packed is None:
            (args,) = cast(list[list[str]], resp.Parser().feed(command))
            execute = self.client.execute_command
            return self._written(record_id, functools.partial(execute, *args), execute(*args))
        return self._written(record_id, functools.partial(packed, command), packed(command))

    def _template(
        self, tenant: str, provider: str, model: str, source: str, conversation: bool
    ) -> bytes:
        """The XADD of this agent's records as a bytes format: its fixed arguments packed
        (the fields its records share: one template per tenant, provider, model and
        source, with or without a conversation), a ``$%d\r\n%b\r\n`` hole for each field
        that changes from call to call (id, in, out, at, conv), in the order of
        `record.encode`."""
        fixed = {
            "v": record.WIRE_VERSION,
            "tenant": tenant,
            "namespace": self.namespace,
            "agent": self.agent,
            "provider": provider,
            "model": model,
            "src": source,
        }
        names: tuple[str, ...] = ("v", "id", "tenant", "namespace", "agent", "provider", "model")
        names += ("in", "out", "at", "src", "conv") if conversation else ("in", "out", "at", "src")
        parts = [b"*%d\r\n" % (3 + 2 * len(names)), _bulk("XADD"), _bulk(self.key), _bulk("*")]
        for name in names:
            parts.append(_bulk(name))
            parts.append(_bulk(fixed[name]) if name in fixed else _HOLE)
        return b"".join(parts)

    async def _written(
        self, record_id: str, again: Callable[[], Awaitable[Any]], first: Awaitable[Any]
    ) -> str:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                entry = await (first if attempt == 1 else again())
            except (redis_errors.AuthenticationError, redis_errors.NoPermissionError) as exc:
                # Not transient: the operator has not (or no longer) set up this writer.
                raise self.unavailable(
                    f"the usage ledger refused this agent's credentials ({type(exc).__name__})"
                ) from None
            except _RETRYABLE as exc:
                if attempt == self.attempts:
                    raise self.unavailable(
                        f"the usage ledger is unreachable after {attempt} attempts "
                        f"({type(exc).__name__})"
                    ) from None
                log.warning("usage record %s not written yet (%s), retrying", record_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
            else:
                return entry if isinstance(entry, str) else entry.decode()
        raise AssertionError("unreachable")  # pragma: no cover

    async def ping(self) -> bool:
        try:
            return bool(await self.client.execute_command("PING"))
        except (*_RETRYABLE, redis_errors.RedisError):
            return False


def _bulk(value: str) -> bytes:
    """One argument of a RESP command (`resp.bulk`), ``%`` doubled for a bytes format."""
    return resp.bulk(value).replace(b"%", b"%%")


_HOLE = resp.BULK  # filled with a field's length and bytes
_TEMPLATES_MAX = 64
