"""What every part of the memory checks: names, conversation ids, timestamps."""

from __future__ import annotations

import datetime as dt
import re

MAX_CONVERSATION_ID = 256

# Tenants and agents are Kubernetes object names; refusing ':' keeps Redis keys
# unambiguous (the conversation id comes last and may hold anything printable).
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(starting and ending with a letter or digit, at most 253 characters)"
        )
    return value


def check_owner(tenant: str, agent: str | None = None) -> None:
    """Check the tenant and, when given, the agent that scope a read or a write."""
    check_name(tenant, "tenant")
    if agent is not None:
        check_name(agent, "agent")


MAX_SUBJECT = 1024


def check_subject(value: str) -> str:
    """A conversation's owner: the caller's subject (a token's ``sub``), never empty."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SUBJECT:
        raise ValueError(f"a subject must be 1 to {MAX_SUBJECT} characters")
    return value


def valid_conversation_id(value: str) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_CONVERSATION_ID
        and not _CONTROL.search(value)
    )


def check_conversation_id(value: str) -> str:
    if not valid_conversation_id(value):
        raise ValueError(
            f"conversation id {value!r} is not valid: 1 to {MAX_CONVERSATION_ID} characters, "
            "no control characters"
        )
    return value


def utc(when: dt.datetime) -> dt.datetime:
    """A naive datetime is taken to be UTC (what the runtime produces everywhere)."""
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
