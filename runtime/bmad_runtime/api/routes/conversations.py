"""The agent's conversations: list them, read one's messages, delete one.

Everything is scoped by the caller's tenant, this agent and the caller's subject:
another tenant's or another subject's conversation does not exist as far as a caller
can tell (404). A token with ``conversations:read:all`` reads, and one with
``conversations:delete:all`` deletes, every subject's conversations of the tenant.
Deleting is audited.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import fastapi
import pydantic
import pydantic.alias_generators

from bmad_runtime import ports
from bmad_runtime.api import deps, errors

router = fastapi.APIRouter(prefix="/v1/conversations", tags=["conversations"])


class _Out(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel, populate_by_name=True
    )


class ConversationSummary(_Out):
    conversation_id: str
    title: str | None = pydantic.Field(
        default=None, description="The start of the first user message."
    )
    turns: int | None = pydantic.Field(default=None, ge=0, description="Messages so far.")
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


class ConversationList(_Out):
    conversations: list[ConversationSummary]


class MessageOut(_Out):
    role: ports.Role
    content: str
    created_at: dt.datetime
    model: str | None = pydantic.Field(default=None, description="The model that answered.")


class MessageList(_Out):
    conversation_id: str
    messages: list[MessageOut]


def _first(row: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def summary(row: dict[str, Any]) -> ConversationSummary:
    """A store's conversation row (snake_case or camelCase keys) as the API shows it."""
    return ConversationSummary(
        conversation_id=str(_first(row, "id", "conversation_id", "conversationId")),
        title=_first(row, "title"),
        turns=_first(row, "turns", "message_count", "last_seq"),
        created_at=_first(row, "created_at", "createdAt"),
        updated_at=_first(row, "updated_at", "updatedAt"),
    )


@router.get(
    "",
    response_model=ConversationList,
    summary="List the caller's conversations with this agent (every subject's with "
    "conversations:read:all), most recent first",
    responses=errors.error_responses(401, 403, 422, 500, 503),
)
async def list_conversations(
    state: deps.State,
    caller: deps.Reader,
    limit: Annotated[int, fastapi.Query(ge=1, le=200, description="At most this many.")] = 50,
) -> ConversationList:
    rows = await state.store.list_conversations(
        tenant=caller.tenant,
        agent=state.agent,
        subject=deps.owner_filter(caller, deps.SCOPE_READ_ALL),
        limit=limit,
    )
    return ConversationList(conversations=[summary(row) for row in rows])


@router.get(
    "/{conversation_id}/messages",
    response_model=MessageList,
    summary="The latest messages of one conversation, oldest first",
    responses=errors.error_responses(401, 403, 404, 422, 500, 503),
)
async def conversation_messages(
    state: deps.State,
    caller: deps.Reader,
    conversation_id: deps.ConversationId,
    limit: Annotated[int, fastapi.Query(ge=1, le=1000, description="At most this many.")] = 100,
) -> MessageList:
    turns = await state.store.history(
        conversation_id,
        tenant=caller.tenant,
        agent=state.agent,
        subject=deps.owner_filter(caller, deps.SCOPE_READ_ALL),
        limit=limit,
    )
    if not turns:
        raise errors.ApiError(
            404, "conversation_not_found", f"this agent has no conversation {conversation_id!r}"
        )
    return MessageList(
        conversation_id=conversation_id,
        messages=[
            MessageOut(role=t.role, content=t.content, created_at=t.created_at, model=t.model)
            for t in turns
        ],
    )


@router.delete(
    "/{conversation_id}",
    status_code=204,
    response_class=fastapi.Response,
    summary="Delete one conversation and its messages (usage and audit records stay)",
    responses={
        204: {"description": "Deleted."},
        **errors.error_responses(401, 403, 404, 422, 500, 503),
    },
)
async def delete_conversation(
    state: deps.State, caller: deps.Deleter, conversation_id: deps.ConversationId
) -> fastapi.Response:
    deleted = await state.store.delete_conversation(
        conversation_id,
        tenant=caller.tenant,
        agent=state.agent,
        subject=deps.owner_filter(caller, deps.SCOPE_DELETE_ALL),
    )
    if not deleted:
        raise errors.ApiError(
            404, "conversation_not_found", f"this agent has no conversation {conversation_id!r}"
        )
    await state.store.audit(
        tenant=caller.tenant,
        agent=state.agent,
        subject=caller.subject,
        action="conversation.delete",
        detail={"conversationId": conversation_id},
    )
    return fastapi.Response(status_code=204)
