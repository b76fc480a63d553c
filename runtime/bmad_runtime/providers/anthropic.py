"""Anthropic's Messages API.

``POST {base}/v1/messages`` with ``x-api-key`` and ``anthropic-version``; ``base`` is
the API root without ``/v1`` (``https://api.anthropic.com``). System turns go into the
top-level ``system`` field, ``max_tokens`` is required, usage is
``input_tokens``/``output_tokens``. Streaming is SSE with named events:
``message_start`` (input usage), ``content_block_delta`` (text), ``message_delta``
(output usage, stop reason), ``message_stop``, and ``error``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from bmad_runtime import ports
from bmad_runtime.providers import base

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096


class AnthropicProvider(base.HttpProvider):
    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def _body(
        self, messages: Sequence[ports.Message], params: dict[str, Any], *, stream: bool
    ) -> dict[str, Any]:
        body: dict[str, Any] = base.merge_params(self.params, params)
        if "stop" in body:
            body.setdefault("stop_sequences", body.pop("stop"))
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        body["model"] = self.model
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        if system:
            body["system"] = system
        body["messages"] = [
            {"role": m.role, "content": m.content} for m in messages if m.role != "system"
        ]
        if stream:
            body["stream"] = True
        return body

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        data = await self._post_json("v1/messages", self._body(messages, params, stream=False))
        content = data.get("content")
        if not isinstance(content, list):
            raise self._error("answered without content")
        text = "".join(
            block["text"]
            for block in content
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        )
        usage = base.usage_of(data.get("usage"), "input_tokens", "output_tokens")
        return ports.Completion(
            text=text,
            usage=usage or base.estimate_usage(messages, text),
            model=self.model,
            provider=self.name,
            finish_reason=str(data.get("stop_reason") or "stop"),
        )

    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[base.StreamEvent, None]:
        body = self._body(messages, params, stream=True)
        parts: list[str] = []
        tokens_in: int | None = None
        tokens_out: int | None = None
        finish = "stop"
        async with contextlib.aclosing(self._sse("v1/messages", body)) as stream:
            async for event, data in stream:
                try:
                    payload = json.loads(data)
                except ValueError:
                    raise self._error(
                        f"streamed a {event or 'message'} event that is not JSON"
                    ) from None
                if not isinstance(payload, dict):
                    continue
                kind = payload.get("type", event)
                if kind == "error":
                    code = base.upstream_code(data.encode())
                    raise self._error(
                        "failed mid-stream" + (f" ({code})" if code else ""),
                        code=code,
                        retryable=code == "overloaded_error",
                    )
                if kind == "message_start":
                    message = payload.get("message")
                    usage = message.get("usage") if isinstance(message, dict) else None
                    if isinstance(usage, dict) and isinstance(usage.get("input_tokens"), int):
                        tokens_in = usage["input_tokens"]
                elif kind == "content_block_delta":
                    delta = payload.get("delta")
                    if isinstance(delta, dict) and delta.get("type") == "text_delta":
                        text = delta.get("text")
                        if isinstance(text, str) and text:
                            parts.append(text)
                            yield base.Delta(text)
                elif kind == "message_delta":
                    usage = payload.get("usage")
                    if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                        tokens_out = usage["output_tokens"]
                    delta = payload.get("delta")
                    if isinstance(delta, dict) and delta.get("stop_reason"):
                        finish = str(delta["stop_reason"])
                elif kind == "message_stop":
                    break
        text = "".join(parts)
        estimate = base.estimate_usage(messages, text)
        yield ports.Completion(
            text=text,
            usage=ports.Usage(
                tokens_in=estimate.tokens_in if tokens_in is None else tokens_in,
                tokens_out=estimate.tokens_out if tokens_out is None else tokens_out,
            ),
            model=self.model,
            provider=self.name,
            finish_reason=finish,
        )

    async def ping(self) -> bool:
        return await self._get_ok("v1/models")
