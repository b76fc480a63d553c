"""Deterministic models for tests and demos: no network, no keys, no randomness.

`EchoProvider` answers ``"[<model>] <last user message>"`` and counts whitespace words
as tokens; with the model parameter ``echoSystem: true`` (``spec.model.params``) it
puts the system messages it was sent (persona, instructions) before that, so a test
or a demo can see what the agent was told. `ScriptedProvider` answers from a list,
can fail its first N calls (to exercise retries and failover) and remembers what it
was sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from bmad_runtime import ports
from bmad_runtime.providers import base

ECHO_SYSTEM = "echo_system"
"""The parameter (``echoSystem`` in an Agent's spec) that makes the echo show the system
messages."""


def last_user_text(messages: Sequence[ports.Message]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""


class EchoProvider(base.BaseProvider):
    def __init__(
        self,
        model: str = "echo-1",
        *,
        name: str = "echo",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        # The Agent's spec.model.params, as the HTTP providers take them.
        self.params = base.merge_params(params)

    def answer(self, messages: Sequence[ports.Message], params: dict[str, Any]) -> str:
        if base.merge_params(self.params, params).get(ECHO_SYSTEM) is True:
            system = "\n\n".join(m.content for m in messages if m.role == "system")
            return f"[{self.model}] {system}\n\n{last_user_text(messages)}"
        return f"[{self.model}] {last_user_text(messages)}"

    def _completion(self, messages: Sequence[ports.Message], text: str) -> ports.Completion:
        return ports.Completion(
            text=text,
            usage=base.estimate_usage(messages, text),
            model=self.model,
            provider=self.name,
        )

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        return self._completion(messages, self.answer(messages, params))

    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[base.StreamEvent, None]:
        text = self.answer(messages, params)
        for piece in base.split_chunks(text):
            yield base.Delta(piece)
        yield self._completion(messages, text)


class ScriptedProvider(EchoProvider):
    """Answers ``answers`` in order (the last one repeats); fails its first calls."""

    def __init__(
        self,
        answers: Sequence[str] = ("ok",),
        *,
        model: str = "scripted-1",
        name: str = "scripted",
        fail_times: int = 0,
        failure_status: int = 500,
        delay: float = 0.0,
        reachable: bool = True,
    ) -> None:
        super().__init__(model, name=name)
        if not answers:
            raise ValueError("a scripted provider needs at least one answer")
        self.answers = list(answers)
        self.fail_times = fail_times
        self.failure_status = failure_status
        self.delay = delay
        self.reachable = reachable
        self.calls: list[list[ports.Message]] = []
        self.params_seen: list[dict[str, Any]] = []

    @property
    def failures(self) -> int:
        return min(len(self.calls), self.fail_times)

    async def _call(self, messages: Sequence[ports.Message], params: dict[str, Any]) -> str:
        self.calls.append(list(messages))
        self.params_seen.append(dict(params))
        if self.delay:
            await asyncio.sleep(self.delay)
        if len(self.calls) <= self.fail_times:
            raise base.ProviderError(
                f"HTTP {self.failure_status} (scripted failure {len(self.calls)})",
                provider=self.name,
                model=self.model,
                status=self.failure_status,
                retryable=self.failure_status in base.RETRYABLE_STATUS,
            )
        answered = len(self.calls) - self.fail_times - 1
        return self.answers[min(answered, len(self.answers) - 1)]

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        return self._completion(messages, await self._call(messages, params))

    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[base.StreamEvent, None]:
        text = await self._call(messages, params)
        for piece in base.split_chunks(text):
            yield base.Delta(piece)
        yield self._completion(messages, text)

    async def ping(self) -> bool:
        return self.reachable
