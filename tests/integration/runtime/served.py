"""Serve a runtime app in-process for a test: its lifespan, an httpx client, readiness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import fastapi
import httpx


async def serve(app: fastapi.FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            yield client


async def ready_soon(client: httpx.AsyncClient, timeout_s: float = 30.0) -> httpx.Response:
    """/readyz once it says ready: the task consumer reaches Redis just after startup."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await client.get("/readyz")
        if answer.status_code == 200 or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.05)
