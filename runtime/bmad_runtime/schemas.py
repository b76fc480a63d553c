"""The body of a turn and its answer: what ``POST /v1/invoke`` and a bus task carry.

A task on the agent's bus has the same payload as an invoke request (without
``stream``) and its result's output is the same answer, so the HTTP route and the
task consumer validate with the same models (`turns.run` and `turns.run_task`).
"""

from __future__ import annotations

import os
from typing import Annotated

import pydantic
import pydantic.alias_generators

# Conversation ids the API accepts (the stores accept more; this keeps URLs plain).
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
# The version (4) and variant (RFC 4122) bits of a random UUID, as uuid.uuid4 sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (4 << 76) | (0x8000 << 48)


def new_conversation_id() -> str:
    """A new conversation's id: a random UUID (version 4) in hex, as ``uuid.uuid4().hex``
    gives it, without building a `uuid.UUID` (on every new conversation's turn)."""
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


class _Camel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel,
        populate_by_name=True,
        extra="forbid",
    )


StopSequence = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]


class InvokeParams(_Camel):
    """Model parameters for this call; they override the Agent's ``spec.model.params``."""

    temperature: float | None = pydantic.Field(default=None, ge=0, le=2)
    max_tokens: int | None = pydantic.Field(
        default=None, ge=1, le=1_000_000, description="Most tokens the answer may use."
    )
    top_p: float | None = pydantic.Field(default=None, ge=0, le=1)
    stop: list[StopSequence] | None = pydantic.Field(
        default=None, max_length=4, description="Stop sequences."
    )
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**31 - 1)


class InvokeRequest(_Camel):
    input: str = pydantic.Field(min_length=1, description="The user's message.")
    conversation_id: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=CONVERSATION_ID_PATTERN,
        description="Continue this conversation; a new one is started when omitted.",
    )
    stream: bool = pydantic.Field(
        default=False, description="Answer as Server-Sent Events (text/event-stream)."
    )
    params: InvokeParams | None = None


class TokenUsage(_Camel):
    tokens_in: int = pydantic.Field(ge=0)
    tokens_out: int = pydantic.Field(ge=0)


class InvokeResponse(_Camel):
    output: str = pydantic.Field(description="The agent's answer.")
    conversation_id: str
    model: str = pydantic.Field(description="The model that answered (maybe a fallback).")
    provider: str
    usage: TokenUsage
    latency_ms: int = pydantic.Field(ge=0)
    finish_reason: str = "stop"
