"""What the model sees: layered context, trimmed to the model's window.

The layers, outermost first, are

1. platform — rules every agent of this installation follows,
2. tenant — what one customer adds (house style, compliance notes),
3. agent — the BMAD persona and its instructions,
4. workflow artifacts — the documents earlier steps created (a PRD, an architecture),
5. the conversation — earlier turns and, last, the new user message.

Layers 1 to 4 become system messages and are always kept. When everything does not fit
in ``contextWindow`` (less what is reserved for the answer), whole conversation turns
are dropped, oldest first; the latest user message (and anything after it) is never
dropped nor cut. If even the system layers and the latest user message do not fit,
`ContextOverflowError` says by how much.

Token counts are estimates, not a tokenizer's: a text costs
``max(ceil(words * 1.3), ceil(characters / 4))`` tokens plus `MESSAGE_OVERHEAD` per
message. Words * 1.3 is close for English prose; characters / 4 catches what has few
spaces (code, URLs, JSON, languages written without spaces). Taking the larger of the
two errs on the side of leaving room, which is what a trimmer should do.

`save_version` records the system layers in ``context_versions`` whenever they change,
so that what an agent was told at any time can be reconstructed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from bmad_runtime import config as config_mod
from bmad_runtime import ports

# Role markers and separators each message costs in chat formats (about 3 or 4 tokens).
MESSAGE_OVERHEAD = 4
WORD_FACTOR = 1.3
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """Approximate tokens of a text, without a tokenizer (see the module docstring)."""
    if not text:
        return 0
    by_words = math.ceil(len(text.split()) * WORD_FACTOR)
    by_chars = math.ceil(len(text) / CHARS_PER_TOKEN)
    return max(by_words, by_chars)


def message_tokens(message: ports.Message) -> int:
    return estimate_tokens(message.content) + MESSAGE_OVERHEAD


def count_tokens(messages: Sequence[ports.Message]) -> int:
    return sum(message_tokens(m) for m in messages)


class ContextOverflowError(ValueError):
    """The layers that are never dropped do not fit the model's window on their own."""

    def __init__(self, *, needed: int, budget: int, context_window: int) -> None:
        super().__init__(
            f"the context needs about {needed} tokens even after dropping every earlier "
            f"conversation turn, but the model's window allows {budget} "
            f"(contextWindow {context_window} less the tokens reserved for the answer): "
            "shorten the message, the instructions or the workflow artifacts, or use a "
            "model with a larger contextWindow"
        )
        self.needed = needed
        self.budget = budget
        self.context_window = context_window


@dataclass(frozen=True, kw_only=True)
class ArtifactLayer:
    """One workflow artifact given to the agent: its name, version and text."""

    name: str
    content: str
    version: str | None = None

    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Layers:
    """The system layers of one agent's context (all optional; empty ones are left out)."""

    platform: str = ""
    tenant: str = ""
    persona: str = ""
    instructions: str = ""
    artifacts: tuple[ArtifactLayer, ...] = field(default_factory=tuple)

    def system_messages(self) -> list[ports.Message]:
        """The system messages, one per non-empty layer, outermost first."""
        out: list[ports.Message] = []
        if self.platform.strip():
            out.append(ports.Message("system", self.platform.strip()))
        if self.tenant.strip():
            out.append(ports.Message("system", self.tenant.strip()))
        agent = "\n\n".join(p.strip() for p in (self.persona, self.instructions) if p.strip())
        if agent:
            out.append(ports.Message("system", agent))
        for artifact in self.artifacts:
            label = artifact.name + (f" (version {artifact.version})" if artifact.version else "")
            out.append(ports.Message("system", f"Workflow artifact {label}:\n\n{artifact.content}"))
        return out

    def to_json(self) -> dict[str, Any]:
        """The layers as stored in ``context_versions.layers``.

        Artifacts are recorded by name, version and SHA-256 only: their text lives,
        versioned, in object storage, and copying it into every version would bloat
        the table.
        """
        return {
            "platform": self.platform,
            "tenant": self.tenant,
            "persona": self.persona,
            "instructions": self.instructions,
            "artifacts": [
                {"name": a.name, "version": a.version, "sha256": a.sha256()} for a in self.artifacts
            ],
        }

    def digest(self) -> str:
        """A SHA-256 over the canonical JSON of `to_json`: equal layers, equal digest."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class AgentLayer:
    """What every turn's context takes from an agent's (frozen) config alone, derived
    once per config (`turns.Services.agent_layer`) rather than on every turn."""

    config: config_mod.AgentConfig
    # Persona and instructions, as the system messages of `Layers`.
    system: tuple[ports.Message, ...]
    context_window: int
    # `count_tokens` of `system`, which `trim` would otherwise count on every turn.
    system_tokens: int

    @classmethod
    def of(cls, config: config_mod.AgentConfig) -> AgentLayer:
        layers = Layers(persona=config.persona_text(), instructions=config.instructions)
        system = tuple(layers.system_messages())
        return cls(config, system, config.context_window, count_tokens(system))


def _latest_user_index(conversation: Sequence[ports.Message]) -> int | None:
    for index in range(len(conversation) - 1, -1, -1):
        if conversation[index].role == "user":
            return index
    return None


def trim(
    system: Sequence[ports.Message],
    conversation: Sequence[ports.Message],
    *,
    context_window: int,
    reserve_tokens: int = 0,
    system_tokens: int | None = None,
) -> list[ports.Message]:
    """System messages plus as much of the conversation as fits, newest kept.

    Turns are dropped oldest first. The latest user message and everything after it
    stay whole; after dropping, leading assistant turns are dropped too, so that the
    kept conversation starts with a user turn (some APIs require that).
    ``system_tokens``: `count_tokens` of ``system``, when the caller has it already.
    """
    if context_window <= 0:
        raise ValueError(f"contextWindow must be positive, not {context_window}")
    budget = context_window - max(reserve_tokens, 0)
    latest = _latest_user_index(conversation)
    keep_from = latest if latest is not None else len(conversation)
    protected = list(conversation[keep_from:])
    older = list(conversation[:keep_from])
    if system_tokens is None:
        system_tokens = count_tokens(system)
    fixed = system_tokens + count_tokens(protected)
    if fixed > budget:
        raise ContextOverflowError(needed=fixed, budget=budget, context_window=context_window)

    room = budget - fixed
    kept: list[ports.Message] = []
    for message in reversed(older):
        cost = message_tokens(message)
        if cost > room:
            break  # dropping oldest first: nothing older than a dropped turn is kept
        kept.append(message)
        room -= cost
    kept.reverse()
    if len(kept) < len(older):
        while kept and kept[0].role != "user":
            kept.pop(0)
    return [*system, *kept, *protected]


def assemble(
    layers: Layers,
    conversation: Sequence[ports.Message | ports.Turn],
    *,
    context_window: int,
    reserve_tokens: int = 0,
) -> list[ports.Message]:
    """The messages for one model call: the layers, then the conversation, trimmed.

    ``conversation`` is oldest first and normally ends with the new user message;
    `ports.Turn`s (as `ConversationStore.recent` returns them) are accepted as well.
    System turns inside the conversation are kept as conversation turns.
    ``reserve_tokens`` is what the answer may use (the model's ``max_tokens``).
    """
    turns = [ports.Message(t.role, t.content) for t in conversation]
    return trim(
        layers.system_messages(),
        turns,
        context_window=context_window,
        reserve_tokens=reserve_tokens,
    )


class SavedVersion(NamedTuple):
    """The context version now current, and whether this call created it."""

    version: int
    created: bool


class Snapshot(NamedTuple):
    """The layers of one (tenant, agent, conversation) as a version store keeps them."""

    tenant: str
    agent: str
    conversation_id: str | None
    layers: dict[str, Any]
    digest: str


class VersionStore(Protocol):
    """Where context versions are written (`memory.context_versions.ContextVersions`)."""

    async def save_context_version(self, snapshot: Snapshot) -> SavedVersion: ...


async def save_version(
    store: VersionStore,
    layers: Layers,
    *,
    tenant: str,
    agent: str,
    conversation_id: str | None = None,
) -> SavedVersion:
    """Record ``layers`` as a new context version unless they equal the latest one.

    Versions count 1, 2, … per (tenant, agent, conversation); ``conversation_id`` None
    versions the agent's layers independently of any conversation.
    """
    return await store.save_context_version(
        Snapshot(tenant, agent, conversation_id, layers.to_json(), layers.digest())
    )
