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

`from_url` talks to Redis with the ledger's own small pipelined client (`resp`): the
XADD is on every answer's path, and redis-py's asyncio client cost about three times
as much CPU per XADD there (see `resp`). A writer also takes any client with redis-py's
``execute_command`` (the tests hand it a redis-py one).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from redis import exceptions as redis_errors

from bmad_integrations.usage import record, resp

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
    ) -> LedgerWriter:
        """A writer with its own client (closed by `aclose`); ``url`` has no password."""
        client = resp.Client.from_url(
            url,
            username=username,
            password=password,
            ca_cert=ca_cert,
            timeout=timeout,
            connect_timeout=timeout,
        )
        return cls(client, namespace=namespace, agent=agent, attempts=attempts, owns_client=True)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    def write(self, rec: record.UsageRecord) -> Coroutine[Any, Any, str]:
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
        command = (
            "XADD",
            self.key,
            "*",
            *itertools.chain.from_iterable(record.encode(rec).items()),
        )
        return self._written(rec, command, self.client.execute_command(*command))

    async def _written(
        self, rec: record.UsageRecord, command: tuple[str, ...], first: Awaitable[Any]
    ) -> str:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                entry = await (first if attempt == 1 else self.client.execute_command(*command))
            except (redis_errors.AuthenticationError, redis_errors.NoPermissionError) as exc:
                # Not transient: the operator has not (or no longer) set up this writer.
                raise LedgerUnavailable(
                    f"the usage ledger refused this agent's credentials ({type(exc).__name__})"
                ) from None
            except _RETRYABLE as exc:
                if attempt == self.attempts:
                    raise LedgerUnavailable(
                        f"the usage ledger is unreachable after {attempt} attempts "
                        f"({type(exc).__name__})"
                    ) from None
                log.warning("usage record %s not written yet (%s), retrying", rec.record_id, exc)
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
