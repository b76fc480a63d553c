"""One model call's usage: the record, its id, its stream, and its wire codec.

This is the contract between the runtime (which writes records) and the operator
(which ingests them): both import this module, so a field added on one side and not
the other fails a unit test rather than a billing run.

Record ids are derived, never random, so that a replay dedupes:
- a task from the bus: ``task:<task id>:<call>`` — a task redelivered after its
  replica was killed between the model's answer and the write gets the same id;
- an HTTP request: ``http:<request id>:<call>`` — a client retrying with the same
  ``X-Request-Id`` gets the same id.
``call`` numbers the model calls of one turn (0 for the first). Ids are unique per
(namespace, agent): the ledger's key is all three, so no agent can shadow another
agent's record by choosing the same id.

On the wire a record is a flat map of strings (the fields of one Redis stream entry)
with a format version ``v``. Decoding is strict: a record that does not decode is
rejected whole, with a reason, and never half-billed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

WIRE_VERSION = "1"
STREAM_PREFIX = "bmad:usage"
# Redis ACL users are named after the stream they may write.
ACL_USER_PREFIX = "bmad-usage"

Source = Literal["task", "http"]
SOURCES: tuple[Source, ...] = ("task", "http")

MAX_ID_CHARS = 200
MAX_TEXT_CHARS = 256
# A single model call beyond a billion tokens is a bug or a forgery, not usage.
MAX_TOKENS = 1_000_000_000

# Kubernetes names: a namespace is a DNS label; an agent (and a tenant, which may be
# a namespace's name) a DNS subdomain. Neither holds ':' or a glob character, which
# keeps stream keys and ACL key patterns unambiguous.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# A record id, and a text field (1-256 characters, none of them a control character).
_RECORD_ID = re.compile(rf"[!-~]{{1,{MAX_ID_CHARS}}}").fullmatch
_TEXT = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_TEXT_CHARS}}}").fullmatch


class RecordError(ValueError):
    """A record that is not valid; `reason` is one CamelCase word for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _check_label(value: str, what: str) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise RecordError("InvalidName", f"{what} {value!r} is not a Kubernetes DNS label")
    return value


def _check_subdomain(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SUBDOMAIN.fullmatch(value):
        raise RecordError("InvalidName", f"{what} {value!r} is not a Kubernetes object name")
    return value


def _check_text(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TEXT(value):
        raise RecordError(
            "InvalidField",
            f"{what} must be 1-{MAX_TEXT_CHARS} characters without control characters",
        )
    return value


def _printable(value: str) -> bool:
    """Printable ASCII without a space, at least one character (``[!-~]+``), tested in C
    without the regular expression engine: a record's id is tested on every call."""
    return value.isascii() and value.isprintable() and " " not in value and value != ""


# The names of records that passed (tenant, namespace, agent, provider, model): they
# repeat on every record of an agent, so each combination is checked once.
_NAMES_CHECKED: set[tuple[str, str, str, str, str]] = set()
_NAMES_CHECKED_MAX = 256


def _check_names(tenant: str, namespace: str, agent: str, provider: str, model: str) -> None:
    _check_subdomain(tenant, "tenant")
    _check_label(namespace, "namespace")
    _check_subdomain(agent, "agent")
    _check_text(provider, "provider")
    _check_text(model, "model")


def stream_key(namespace: str, agent: str) -> str:
    """The Redis stream an agent writes its usage to; only that agent may write it."""
    return f"{STREAM_PREFIX}:{_check_label(namespace, 'namespace')}:" + _check_subdomain(
        agent, "agent"
    )


def parse_stream_key(key: str) -> tuple[str, str]:
    """(namespace, agent) of a usage stream key; RecordError when it is not one."""
    parts = key.split(":")
    if len(parts) != 4 or ":".join(parts[:2]) != STREAM_PREFIX:
        raise RecordError("InvalidStream", f"{key!r} is not a usage stream")
    return _check_label(parts[2], "namespace"), _check_subdomain(parts[3], "agent")


def acl_user(namespace: str, agent: str) -> str:
    """The Redis ACL user that may append to exactly this agent's stream."""
    return f"{ACL_USER_PREFIX}:{_check_label(namespace, 'namespace')}:" + _check_subdomain(
        agent, "agent"
    )


def _derive(source: Source, ident: str, call: int) -> str:
    if call < 0:
        raise RecordError("InvalidField", f"call must be 0 or more, not {call}")
    if not _printable(ident):
        raise RecordError("InvalidField", f"{source} id {ident!r} must be printable ASCII")
    raw = f"{source}:{ident}:{call}"
    if len(raw) <= MAX_ID_CHARS:
        return raw
    # Long ids (task ids may have 256 characters) keep a fixed-length, stable form.
    return f"{source}:sha256:{hashlib.sha256(ident.encode()).hexdigest()}:{call}"


def task_record_id(task_id: str, call: int = 0) -> str:
    """The record id of model call ``call`` of a bus task: the same on every delivery."""
    return _derive("task", task_id, call)


def request_record_id(request_id: str, call: int = 0) -> str:
    """The record id of model call ``call`` of an HTTP request (its X-Request-Id)."""
    return _derive("http", request_id, call)


def utc(when: dt.datetime) -> dt.datetime:
    """``when`` in UTC; `RecordError` for a time without a zone."""
    if when.tzinfo is None:
        raise RecordError("InvalidField", "occurred_at must carry a time zone")
    return when.astimezone(dt.UTC)


def call_fields_pass(
    record_id: str, tokens_in: int, tokens_out: int, conversation: str | None
) -> bool:
    """Whether the fields that change from call to call pass, in one test: a record
    whose names passed before (`check`, `writer.LedgerWriter`'s formats) needs no other.
    Written without the regular expressions `check` names its reasons with, and
    accepting exactly what they accept (`tests/unit/usage/test_usage_record.py`); an
    ASCII conversation only (any other is tested by `check`'s pattern)."""
    return (
        type(record_id) is str
        and len(record_id) <= MAX_ID_CHARS
        and record_id.isascii()  # with the next two and a length: `_RECORD_ID`
        and record_id.isprintable()
        and " " not in record_id
        and record_id != ""
        and type(tokens_in) is int
        and type(tokens_out) is int
        and 0 <= tokens_in <= MAX_TOKENS
        and 0 <= tokens_out <= MAX_TOKENS
        and (
            conversation is None
            or (
                type(conversation) is str
                and len(conversation) <= MAX_TEXT_CHARS
                and conversation.isascii()  # then printable is all `_TEXT` asks
                and conversation.isprintable()
                and conversation != ""
            )
        )
    )


def check(
    *,
    record_id: str,
    tenant: str,
    namespace: str,
    agent: str,
    provider: str,
    model: str,
    tokens_in: int,
    tokens_out: int,
    source: str,
    conversation: str | None,
) -> None:
    """The checks of a record's fields (all but its time: see `utc`), made by every
    `UsageRecord`: a record whose names (tenant, namespace, agent, provider, model)
    passed before takes one test of the others (`call_fields_pass`); any other is
    checked field by field for the reason (`RecordError`)."""
    try:
        if (
            source in SOURCES
            and (tenant, namespace, agent, provider, model) in _NAMES_CHECKED
            and call_fields_pass(record_id, tokens_in, tokens_out, conversation)
        ):
            return
    except TypeError:  # a name that cannot be hashed: refused below
        pass
    if not isinstance(record_id, str) or not _RECORD_ID(record_id):
        raise RecordError(
            "InvalidField", f"record_id must be 1-{MAX_ID_CHARS} printable ASCII characters"
        )
    _check_names(tenant, namespace, agent, provider, model)
    _check_tokens(tokens_in, tokens_out)
    if source not in SOURCES:
        raise RecordError("InvalidField", f"source must be one of {SOURCES}")
    if conversation is not None:
        _check_text(conversation, "conversation")
    if len(_NAMES_CHECKED) >= _NAMES_CHECKED_MAX:
        _NAMES_CHECKED.clear()
    _NAMES_CHECKED.add((tenant, namespace, agent, provider, model))


def _check_tokens(tokens_in: int, tokens_out: int) -> None:
    for what, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError("InvalidField", f"{what} must be an integer")
        if not 0 <= value <= MAX_TOKENS:
            raise RecordError("InvalidField", f"{what} must be 0..{MAX_TOKENS}, not {value}")


@dataclass(frozen=True)
class UsageRecord:
    """One model call's usage, as the runtime reports it (no price: see `prices`)."""

    record_id: str
    tenant: str
    namespace: str
    agent: str
    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    occurred_at: dt.datetime
    source: Source
    conversation: str | None = None

    def __post_init__(self) -> None:
        check(
            record_id=self.record_id,
            tenant=self.tenant,
            namespace=self.namespace,
            agent=self.agent,
            provider=self.provider,
            model=self.model,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            source=self.source,
            conversation=self.conversation,
        )
        object.__setattr__(self, "occurred_at", utc(self.occurred_at))

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


def encode(record: UsageRecord) -> dict[str, str]:
    """The fields of the stream entry (XADD) for a record."""
    fields = {
        "v": WIRE_VERSION,
        "id": record.record_id,
        "tenant": record.tenant,
        "namespace": record.namespace,
        "agent": record.agent,
        "provider": record.provider,
        "model": record.model,
        "in": str(record.tokens_in),
        "out": str(record.tokens_out),
        "at": record.occurred_at.isoformat(),
        "src": record.source,
    }
    if record.conversation is not None:
        fields["conv"] = record.conversation
    return fields


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode(fields: Mapping[Any, Any]) -> UsageRecord:
    """A record from a stream entry's fields; RecordError says why one is refused."""
    try:
        data = {_text(k): _text(v) for k, v in fields.items()}
    except UnicodeDecodeError:
        raise RecordError("Malformed", "the entry is not UTF-8") from None
    version = data.get("v")
    if version != WIRE_VERSION:
        raise RecordError("UnknownVersion", f"wire version {version!r} is not {WIRE_VERSION!r}")
    required = ("id", "tenant", "namespace", "agent", "provider", "model", "in", "out", "at")
    missing = [name for name in (*required, "src") if name not in data]
    if missing:
        raise RecordError("Malformed", f"the entry lacks {', '.join(missing)}")
    try:
        tokens_in, tokens_out = int(data["in"]), int(data["out"])
    except ValueError:
        raise RecordError("InvalidField", "token counts must be integers") from None
    try:
        occurred_at = dt.datetime.fromisoformat(data["at"])
    except ValueError:
        raise RecordError("InvalidField", f"time {data['at']!r} is not ISO 8601") from None
    source = data["src"]
    if source not in SOURCES:
        raise RecordError("InvalidField", f"source {source!r} is not one of {SOURCES}")
    return UsageRecord(
        record_id=data["id"],
        tenant=data["tenant"],
        namespace=data["namespace"],
        agent=data["agent"],
        provider=data["provider"],
        model=data["model"],
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        occurred_at=occurred_at,
        source="task" if source == "task" else "http",
        conversation=data.get("conv"),
    )
