"""The test worker's command line and its deterministic handlers, with a fake Redis.

The worker (bus_worker.py, next to this file) is a test aid that
test_bus_workers.py runs as processes; these unit tests pin down what it answers."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_integrations import taskwire

from . import bus_worker as worker

pytestmark = pytest.mark.unit


class FakePipeline:
    def __init__(self, store: dict[str, int], ttls: dict[str, int]) -> None:
        self.store, self.ttls, self.ops = store, ttls, list[tuple[str, str, int]]()

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def incr(self, key: str) -> None:
        self.ops.append(("incr", key, 0))

    def expire(self, key: str, seconds: int) -> None:
        self.ops.append(("expire", key, seconds))

    async def execute(self) -> list[Any]:
        out: list[Any] = []
        for op, key, arg in self.ops:
            if op == "incr":
                self.store[key] = self.store.get(key, 0) + 1
                out.append(self.store[key])
            else:
                self.ttls[key] = arg
                out.append(True)
        return out


class FakeRedis:
    def __init__(self) -> None:
        self.store: dict[str, int] = {}
        self.ttls: dict[str, int] = {}

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self.store, self.ttls)


KEYS = taskwire.Keys("acme", "dev")


def task(task_id: str = "t1", **payload: Any) -> taskwire.Task:
    return taskwire.Task(task_id=task_id, payload=payload, message_id="1-0", attempt=1)


async def test_echo_upper_cases_the_input_names_the_consumer_and_counts_runs() -> None:
    redis = FakeRedis()
    handler = worker.make_handler("echo", redis=redis, keys=KEYS, consumer="w1")  # type: ignore[arg-type]

    first = await handler(task(input="make a plan"))
    second = await handler(task(input="make a plan"))

    assert first == {"output": "MAKE A PLAN", "consumer": "w1", "run": 1}
    assert second["run"] == 2
    assert redis.store == {"bmad:acme:dev:runs:t1": 2}
    assert redis.ttls["bmad:acme:dev:runs:t1"] == 86_400


async def test_echo_without_input_answers_an_empty_string() -> None:
    handler = worker.make_handler("echo", redis=FakeRedis(), keys=KEYS, consumer="w1")  # type: ignore[arg-type]
    assert (await handler(task()))["output"] == ""


async def test_fail_counts_the_run_and_raises() -> None:
    redis = FakeRedis()
    handler = worker.make_handler("fail", redis=redis, keys=KEYS, consumer="w1")  # type: ignore[arg-type]
    with pytest.raises(worker.DeliberateError, match="run 1"):
        await handler(task())
    assert redis.store["bmad:acme:dev:runs:t1"] == 1


def test_an_unknown_handler_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown handler"):
        worker.make_handler("llm", redis=FakeRedis(), keys=KEYS, consumer="w1")  # type: ignore[arg-type]


def test_the_command_line_has_the_documented_options() -> None:
    args = worker.parse_args(
        [
            "--redis-url",
            "redis://127.0.0.1:6379/0",
            "--tenant",
            "acme",
            "--agent",
            "dev",
            "--consumer",
            "w1",
            "--task-delay-ms",
            "25",
            "--min-idle-ms",
            "1000",
            "--max-attempts",
            "2",
            "--grace-s",
            "0.5",
        ]
    )
    assert args.handler == "echo"
    assert args.task_delay_ms == 25
    assert args.min_idle_ms == 1000
    assert args.max_attempts == 2
    assert args.grace_s == 0.5


def test_the_url_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(worker.URL_ENV, "redis://127.0.0.1:1/0")
    args = worker.parse_args(["--tenant", "acme", "--agent", "dev", "--consumer", "w1"])
    assert args.redis_url == "redis://127.0.0.1:1/0"


def test_without_a_url_the_worker_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(worker.URL_ENV, raising=False)
    with pytest.raises(SystemExit):
        worker.parse_args(["--tenant", "acme", "--agent", "dev", "--consumer", "w1"])
    assert "--redis-url or $BMAD_REDIS_URL is required" in capsys.readouterr().err
