"""OpenAI's Chat Completions API, and every server that speaks it.

``POST {base}/chat/completions`` with ``Authorization: Bearer``; ``base`` is the API
root that serves ``/models`` (``https://api.openai.com/v1`` or a compatible server's,
usually ending in ``/v1``). Streaming is SSE ``data:`` lines of chunks, ``[DONE]`` at
the end; ``stream_options.include_usage`` asks for a last chunk carrying the usage.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from bmad_runtime import ports
from bmad_runtime.providers import base


class OpenAICompatProvider(base.HttpProvider):
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _body(
        self, messages: Sequence[ports.Message], params: dict[str, Any], *, stream: bool
    ) -> dict[str, Any]:
        body: dict[str, Any] = base.merge_params(self.params, params)
        body["model"] = self.model
        body["messages"] = [{"role": m.role, "content": m.content} for m in messages]
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        data = await self._post_json("chat/completions", self._body(messages, params, stream=False))
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._error("answered without choices")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        text = content if isinstance(content, str) else ""
        usage = base.usage_of(data.get("usage"), "prompt_tokens", "completion_tokens")
        return ports.Completion(
            text=text,
            usage=usage or base.estimate_usage(messages, text),
            model=self.model,
            provider=self.name,
            finish_reason=str(choices[0].get("finish_reason") or "stop"),
        )

    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[base.StreamEvent, None]:
        body = self._body(messages, params, stream=True)
        parts: list[str] = []
        usage: ports.Usage | None = None
        finish = "stop"
        async with contextlib.aclosing(self._sse("chat/completions", body)) as stream:
            async for _event, data in stream:
                if data.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise self._error("streamed a chunk that is not JSON") from None
                if not isinstance(chunk, dict):
                    continue
                if isinstance(chunk.get("error"), dict):
                    raise self._error(
                        "failed mid-stream", code=base.upstream_code(json.dumps(chunk).encode())
                    )
                usage = (
                    base.usage_of(chunk.get("usage"), "prompt_tokens", "completion_tokens") or usage
                )
                choices = chunk.get("choices")
                if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                    continue
                delta = choices[0].get("delta")
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str) and content:
                    parts.append(content)
                    yield base.Delta(content)
                if choices[0].get("finish_reason"):
                    finish = str(choices[0]["finish_reason"])
        text = "".join(parts)
        yield ports.Completion(
            text=text,
            usage=usage or base.estimate_usage(messages, text),
            model=self.model,
            provider=self.name,
            finish_reason=finish,
        )

    async def ping(self) -> bool:
        return await self._get_ok("models")
