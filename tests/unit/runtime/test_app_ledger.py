"""The runtime with the platform usage ledger: a record per model call before the
answer, unique ids, budget refusals (429 budget_exhausted) and an unwritable ledger
(503), with the echo provider and a fake ledger."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx
import pytest

from bmad_runtime import app as app_mod
from bmad_runtime import config, ports, settings, telemetry, turns
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import echo, router

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


class FakeLedger:
    def __init__(self) -> None:
        self.entries: list[ports.LedgerEntry] = []
        self.budget: ports.Budget | None = None
        self.broken = False

    async def write(self, entry: ports.LedgerEntry) -> None:
        if self.broken:
            raise ports.LedgerUnavailableError("the usage ledger is unreachable")
        self.entries.append(entry)

    async def exhausted(self) -> ports.Budget | None:
        return self.budget


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
async def client(ledger: FakeLedger) -> AsyncIterator[httpx.AsyncClient]:
    app = app_mod.create_app(
        settings.RuntimeSettings(agent_name="dev", agent_namespace="team-a", auth_mode="none"),
        store=inprocess.InProcessStore(),
        providers=router.ModelRouter([echo.EchoProvider()]),
        authenticator=None,
        limiter=None,
    )
    app.state.runtime.ledger = ledger
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            yield http


async def test_every_answer_has_one_record_with_its_tokens_and_a_unique_id(
    client: httpx.AsyncClient, ledger: FakeLedger
) -> None:
    answers = []
    for _ in range(3):
        response = await client.post(
            "/v1/invoke", json={"input": "hello there"}, headers={"X-Request-Id": "same-id"}
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert len(ledger.entries) == 3
    # A caller repeating its request id gets three answers: three records, three ids.
    assert len({e.record_id for e in ledger.entries}) == 3
    for entry, answer in zip(ledger.entries, answers, strict=True):
        assert entry.record_id.startswith("http:same-id.")
        assert entry.source == "http"
        assert entry.tokens_in == answer["usage"]["tokensIn"]
        assert entry.tokens_out == answer["usage"]["tokensOut"]
        assert entry.conversation_id == answer["conversationId"]
        assert entry.provider == answer["provider"]


async def test_an_exhausted_budget_refuses_with_429_the_code_and_the_reset(
    client: httpx.AsyncClient, ledger: FakeLedger
) -> None:
    resets = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    ledger.budget = ports.Budget(limit=1000, used=1004, resets_at=resets, message="used up")
    response = await client.post("/v1/invoke", json={"input": "hello"})
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "budget_exhausted"
    assert dt.datetime.fromisoformat(error["resetsAt"]) == resets
    assert 7100 <= int(response.headers["Retry-After"]) <= 7200
    assert ledger.entries == []  # the model was not asked
    ledger.budget = None
    assert (await client.post("/v1/invoke", json={"input": "hello"})).status_code == 200


async def test_no_answer_leaves_without_its_record(
    client: httpx.AsyncClient, ledger: FakeLedger
) -> None:
    ledger.broken = True
    response = await client.post("/v1/invoke", json={"input": "hello"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "usage_ledger_unavailable"
    assert "hello" not in response.text


class AckedLedger(FakeLedger):
    """Takes the record when `write` is called (as the platform ledger sends it) and
    acknowledges it when the test says so, or refuses it then."""

    def __init__(self) -> None:
        super().__init__()
        self.ack = asyncio.Event()
        self.sent = asyncio.Event()

    def write(self, entry: ports.LedgerEntry) -> Coroutine[Any, Any, None]:
        self.entries.append(entry)
        self.sent.set()
        return self._acked()

    async def _acked(self) -> None:
        await self.ack.wait()
        if self.broken:
            raise ports.LedgerUnavailableError("the usage ledger lost the record")


async def _served(ledger: FakeLedger, store: inprocess.InProcessStore) -> httpx.AsyncClient:
    app = app_mod.create_app(
        settings.RuntimeSettings(agent_name="dev", agent_namespace="team-a", auth_mode="none"),
        store=store,
        providers=router.ModelRouter([echo.EchoProvider()]),
        authenticator=None,
        limiter=None,
    )
    app.state.runtime.ledger = ledger
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent")


async def test_the_answer_waits_for_the_ledger_and_the_turn_is_stored_after_it() -> None:
    ledger, store = AckedLedger(), inprocess.InProcessStore()
    async with await _served(ledger, store) as http:
        request = asyncio.create_task(http.post("/v1/invoke", json={"input": "hello"}))
        async with asyncio.timeout(5):
            await ledger.sent.wait()  # the record is sent ...
        for _ in range(50):
            await asyncio.sleep(0)
        assert not request.done()  # ... and the answer waits for it
        assert store.conversations == {}  # nothing stored before the ledger has it
        ledger.ack.set()
        response = await request
    assert response.status_code == 200, response.text
    assert response.json()["conversationId"] == ledger.entries[0].conversation_id
    assert len(store.conversations) == 1
    assert len(store.usage) == 1


async def test_a_record_the_ledger_refuses_after_it_was_sent_answers_503_and_stores_nothing() -> (
    None
):
    ledger, store = AckedLedger(), inprocess.InProcessStore()
    ledger.broken = True
    ledger.ack.set()
    async with await _served(ledger, store) as http:
        response = await http.post("/v1/invoke", json={"input": "hello"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "usage_ledger_unavailable"
    assert "hello" not in response.text
    assert len(ledger.entries) == 1
    assert store.conversations == {}
    assert store.usage == []
    assert store.audit_log == []


def test_task_record_ids_are_the_same_on_every_delivery() -> None:
    first = turns.record_id(request_id="t-1", task_id="t-1")
    assert first == turns.record_id(request_id="t-1", task_id="t-1") == "task:t-1:0"
    http_ids = {turns.record_id(request_id="r", task_id=None) for _ in range(50)}
    assert len(http_ids) == 50
    salts = set()
    for http_id in http_ids:  # http:<request id>.<the process's salt><a counter>:<call>
        found = re.fullmatch(r"http:r\.([0-9a-f]{32})[0-9a-f]{12}:0", http_id)
        assert found is not None, http_id
        salts.add(found.group(1))
    assert len(salts) == 1


def test_a_forked_process_draws_its_own_salt_for_http_record_ids() -> None:
    # A server that forks its workers after import must not give two of them one salt:
    # their counters start alike, and their calls' ids would be equal.
    ours = turns.record_id(request_id="r", task_id=None)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out without the parent's clean-up
        os.close(read)
        os.write(write, turns.record_id(request_id="r", task_id=None).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        theirs = pipe.read().decode()
    os.waitpid(pid, 0)
    assert theirs.startswith("http:r.")
    assert len(theirs) == len(ours)
    assert theirs[7:39] != ours[7:39]  # the salts (128 random bits each)


def _services(ledger: FakeLedger) -> turns.Services:
    return turns.Services(
        tenant="acme",
        agent="dev",
        config=config.echo_config(agent="dev"),
        store=inprocess.InProcessStore(),
        router=router.ModelRouter([echo.EchoProvider()]),
        limiter=None,
        metrics=telemetry.Metrics(),
        ledger=ledger,
    )


async def test_a_task_is_recorded_under_its_task_id_and_refused_past_the_budget(
    ledger: FakeLedger,
) -> None:
    services = _services(ledger)
    answer = await turns.run_task(services, {"input": "hello"}, task_id="t-42")
    await turns.run_task(services, {"input": "hello"}, task_id="t-42")  # a redelivery
    assert [e.record_id for e in ledger.entries] == ["task:t-42:0", "task:t-42:0"]
    assert ledger.entries[0].source == "task"
    assert ledger.entries[0].tokens_out == answer["usage"]["tokensOut"]
    ledger.budget = ports.Budget(
        limit=1, used=2, resets_at=dt.datetime.now(dt.UTC), message="used up"
    )
    with pytest.raises(turns.BudgetExhaustedError):
        await turns.run_task(services, {"input": "hello"}, task_id="t-43")
    assert len(ledger.entries) == 2
