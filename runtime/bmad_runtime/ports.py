"""The seams of the runtime: what the HTTP app needs from its stores, auth and limits.

The use case (`turns`) and the HTTP layer (`api`) are written against these protocols
only; the implementations (`memory.store`, `memory.inprocess`, `auth`, `ratelimit`)
and the stand-ins of the unit tests satisfy them, so each part can be built and tested
on its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

Role = Literal["system", "user", "assistant"]

_Frozen = TypeVar("_Frozen", bound=type)


def direct_init(cls: _Frozen) -> _Frozen:
    """Give a frozen dataclass an ``__init__`` that writes its fields into the instance's
    ``__dict__``, for the records every turn makes (several per request).

    The ``__init__`` dataclasses generates for a frozen class calls ``object.__setattr__``
    once per field, to get past the class's own ``__setattr__``, which refuses every
    write: about half of the cost of making one. This one takes the same parameters, in
    the same order, with the same defaults and keyword-only fields; the instance stays as
    frozen (a write after ``__init__`` still raises `dataclasses.FrozenInstanceError`).
    A class it cannot make so (not a frozen dataclass; slots, a default factory, a field
    outside ``__init__``, ``__post_init__``) is refused when it is defined.
    """
    params = getattr(cls, "__dataclass_params__", None)
    fields = dataclasses.fields(cls) if params is not None else ()
    if (
        params is None
        or not params.frozen
        or "__slots__" in cls.__dict__
        or hasattr(cls, "__post_init__")
        or any(not f.init or f.default_factory is not dataclasses.MISSING for f in fields)
        or any(f.name in {"self", "__fields__"} for f in fields)
    ):
        raise TypeError(f"direct_init: {cls.__name__} is not a plain frozen dataclass")
    defaults: dict[str, Any] = {}
    positional: list[str] = []
    keyword: list[str] = []
    for f in fields:
        param = f.name
        if f.default is not dataclasses.MISSING:
            defaults[f"_default_{f.name}"] = f.default
            param = f"{f.name}=_default_{f.name}"
        (keyword if f.kw_only else positional).append(param)
    signature = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    lines = [f"def __init__({signature}):", "    __fields__ = self.__dict__"]
    lines += [f"    __fields__[{f.name!r}] = {f.name}" for f in fields]
    made: dict[str, Any] = {}
    # Generated as dataclasses generates its own: the field names are identifiers.
    exec("\n".join(lines), defaults, made)  # noqa: S102
    init, generated = made["__init__"], cls.__dict__["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(generated.__annotations__)
    # The same call as before, or none (an InitVar, say, is not among the fields).
    if inspect.signature(init) != inspect.signature(generated):
        raise TypeError(f"direct_init: {cls.__name__} is not a plain frozen dataclass")
    cls.__init__ = init  # type: ignore[misc]  # the class, not an instance
    return cls


@direct_init
@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@direct_init
@dataclass(frozen=True)
class Usage:
    tokens_in: int
    tokens_out: int


@direct_init
@dataclass(frozen=True)
class Completion:
    """One model answer: the text, what it cost and which model served it."""

    text: str
    usage: Usage
    model: str
    provider: str
    finish_reason: str = "stop"


@direct_init
@dataclass(frozen=True)
class Turn:
    conversation_id: str
    role: Role
    content: str
    created_at: dt.datetime
    model: str | None = None


@dataclass(frozen=True)
class Principal:
    """Who called: from a verified JWT (or the anonymous principal when auth is off)."""

    subject: str
    tenant: str
    scopes: frozenset[str] = field(default_factory=frozenset)


@direct_init
@dataclass(frozen=True)
class UsageRecord:
    tenant: str
    agent: str
    conversation_id: str | None
    model: str
    provider: str
    tokens_in: int
    tokens_out: int
    latency_ms: int


@direct_init
@dataclass(frozen=True)
class TurnRecord:
    """What one answered turn leaves in the store (`ConversationStore.record_turn`): its
    turns, oldest first, of one conversation (none when the agent keeps no memory), the
    usage record of its model call and an audit entry, all of `tenant`'s `agent`, as
    `subject`."""

    tenant: str
    agent: str
    subject: str
    turns: tuple[Turn, ...]
    usage: UsageRecord
    action: str
    detail: dict[str, Any]


class ConversationStore(Protocol):
    """Hot turns in Redis, full history, usage records and the audit log in PostgreSQL.

    A conversation belongs to the subject whose turn started it. ``subject`` scopes
    every call: `append` and `recent` raise `ConversationNotFoundError` for another
    subject's conversation; `history`, `list_conversations` and `delete_conversation`
    see only the subject's own, or every subject's when ``subject`` is None (a caller
    whose scopes grant that).
    """

    async def append(self, turn: Turn, *, tenant: str, agent: str, subject: str) -> None: ...

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int, subject: str
    ) -> list[Turn]: ...

    async def history(
        self,
        conversation_id: str,
        *,
        tenant: str,
        agent: str,
        subject: str | None,
        limit: int = 100,
    ) -> list[Turn]: ...

    async def list_conversations(
        self, *, tenant: str, agent: str, subject: str | None, limit: int = 50
    ) -> list[dict[str, Any]]: ...

    async def delete_conversation(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> bool: ...

    async def record_usage(self, record: UsageRecord) -> None: ...

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None: ...

    async def record_turn(self, record: TurnRecord) -> None:
        """Store a turn's record as `append` of each of its turns, `record_usage` and
        `audit` would, in that order; `ConversationNotFoundError` (and nothing stored)
        when the conversation is another subject's. A store may write it all at once
        (the durable one: one PostgreSQL statement and one Redis call)."""
        ...

    async def ping(self) -> bool: ...


class Provider(Protocol):
    """A model API. `name` is the provider name; `model` the model it serves."""

    name: str
    model: str

    async def complete(
        self, messages: Sequence[Message], *, params: dict[str, Any]
    ) -> Completion: ...

    def stream(
        self, messages: Sequence[Message], *, params: dict[str, Any]
    ) -> AsyncIterator[str]: ...


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal:
        """Verify a Bearer token; raise `AuthError` (401/403 with a clear message)."""
        ...


class Limiter(Protocol):
    async def hit(self, *, tenant: str, agent: str, tokens: int = 0) -> float | None:
        """Count one request (and tokens); None when allowed, else seconds to wait."""
        ...


class ConversationNotFoundError(Exception):
    """The conversation belongs to another subject: to this caller, it does not exist."""


@direct_init
@dataclass(frozen=True)
class LedgerEntry:
    """One model call as the platform's usage ledger records it (`UsageLedger`)."""

    record_id: str
    source: Literal["task", "http"]
    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    conversation_id: str | None
    occurred_at: dt.datetime


@dataclass(frozen=True)
class Budget:
    """The tenant's token (or cost) budget is used up until `resets_at` (``spec.limits``);
    ``limit`` None: it has no token budget, its cost budget is used up."""

    limit: int | None
    used: int
    resets_at: dt.datetime
    message: str


class UsageLedger(Protocol):
    """The platform's usage ledger (`ledger.PlatformLedger`), when the operator meters."""

    def write(self, entry: LedgerEntry) -> Awaitable[object]:
        """Append the record: the result, awaited, raises `LedgerUnavailableError` when
        it cannot be written. The record may be sent before it is awaited (the platform
        ledger's is), so a caller can do other work meanwhile; the answer waits for it."""
        ...

    async def exhausted(self) -> Budget | None:
        """The tenant's budget when it is used up now; None while work may go on."""
        ...


class LedgerUnavailableError(Exception):
    """The usage record could not be written: the turn is not answered."""


class StoreUnavailableError(Exception):
    """The conversation store cannot be used: not connected yet, or not bound at all."""


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
