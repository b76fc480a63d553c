"""The usage record: derived ids, stream keys, and a strict wire codec."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from bmad_integrations.usage import record

pytestmark = pytest.mark.unit

AT = dt.datetime(2026, 3, 31, 23, 59, 59, 500_000, tzinfo=dt.UTC)


def make(**changes: Any) -> record.UsageRecord:
    fields: dict[str, Any] = {
        "record_id": record.task_record_id("task-1"),
        "tenant": "acme",
        "namespace": "acme-dev",
        "agent": "analyst",
        "provider": "openai",
        "model": "gpt-4o",
        "tokens_in": 120,
        "tokens_out": 30,
        "occurred_at": AT,
        "source": "task",
        "conversation": "c-1",
    }
    fields.update(changes)
    return record.UsageRecord(**fields)


def test_a_replayed_task_or_request_gets_the_same_record_id() -> None:
    assert record.task_record_id("t-42") == record.task_record_id("t-42") == "task:t-42:0"
    assert record.task_record_id("t-42", 1) == "task:t-42:1"
    assert record.request_record_id("req-9") == "http:req-9:0"
    assert record.task_record_id("x") != record.request_record_id("x")


def test_long_ids_are_hashed_to_a_bounded_stable_form() -> None:
    long_id = "t" * 256
    rid = record.task_record_id(long_id)
    assert len(rid) <= record.MAX_ID_CHARS
    assert rid == record.task_record_id(long_id)
    assert rid != record.task_record_id("t" * 255 + "u")


@pytest.mark.parametrize("bad", ["", "with space", "tab\there", "é"])
def test_ids_that_are_not_printable_ascii_are_refused(bad: str) -> None:
    with pytest.raises(record.RecordError):
        record.task_record_id(bad)


def test_stream_key_and_acl_user_name_the_namespace_and_agent() -> None:
    assert record.stream_key("acme-dev", "analyst") == "bmad:usage:acme-dev:analyst"
    assert record.parse_stream_key("bmad:usage:acme-dev:analyst.v2") == ("acme-dev", "analyst.v2")
    assert record.acl_user("acme-dev", "analyst") == "bmad-usage:acme-dev:analyst"


@pytest.mark.parametrize(
    "key",
    ["bmad:usage:acme", "bmad:usage:acme:a:b", "other:usage:a:b", "bmad:usage:Acme:a", "x"],
)
def test_keys_that_are_not_usage_streams_are_refused(key: str) -> None:
    with pytest.raises(record.RecordError):
        record.parse_stream_key(key)


@pytest.mark.parametrize(
    ("namespace", "agent"), [("a*", "b"), ("a", "b*"), ("a:b", "c"), ("a", "[b]"), ("A", "b")]
)
def test_names_that_would_make_a_key_pattern_ambiguous_are_refused(
    namespace: str, agent: str
) -> None:
    with pytest.raises(record.RecordError):
        record.stream_key(namespace, agent)


def test_the_codec_round_trips_every_field() -> None:
    rec = make()
    fields = record.encode(rec)
    assert all(isinstance(v, str) for v in fields.values())
    assert record.decode(fields) == rec
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}
    assert record.decode(as_bytes) == rec
    without = make(conversation=None, source="http", record_id="http:r:0")
    assert "conv" not in record.encode(without)
    assert record.decode(record.encode(without)) == without


def test_times_are_kept_in_utc_and_must_carry_a_zone() -> None:
    other_zone = AT.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert make(occurred_at=other_zone).occurred_at == AT
    assert make(occurred_at=other_zone).occurred_at.tzinfo == dt.UTC
    with pytest.raises(record.RecordError):
        make(occurred_at=AT.replace(tzinfo=None))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": "2"}, "UnknownVersion"),
        ({"v": None}, "UnknownVersion"),
        ({"in": "12.5"}, "InvalidField"),
        ({"out": "-1"}, "InvalidField"),
        ({"in": str(record.MAX_TOKENS + 1)}, "InvalidField"),
        ({"at": "yesterday"}, "InvalidField"),
        ({"at": "2026-03-31T10:00:00"}, "InvalidField"),
        ({"src": "cron"}, "InvalidField"),
        ({"agent": "Bad_Name"}, "InvalidName"),
        ({"model": None}, "Malformed"),
        ({"provider": "x" * 300}, "InvalidField"),
        ({"conv": "line\nbreak"}, "InvalidField"),
        ({"id": "has space"}, "InvalidField"),
    ],
)
def test_decoding_refuses_whole_records_with_a_reason(
    change: dict[str, str | None], reason: str
) -> None:
    fields: dict[str, str] = record.encode(make())
    for key, value in change.items():
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    with pytest.raises(record.RecordError) as caught:
        record.decode(fields)
    assert caught.value.reason == reason


def test_bools_are_not_token_counts() -> None:
    with pytest.raises(record.RecordError):
        make(tokens_in=True)


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": "Bad_Tenant"},
        {"model": "line\nbreak"},
        {"provider": ""},
        {"tenant": ["not", "hashable"]},
        {"namespace": 7},
    ],
)
def test_the_names_every_record_repeats_are_checked_on_every_record(
    change: dict[str, object],
) -> None:
    make()  # a valid combination, remembered
    for _ in range(2):  # a refused one is not: refused again
        with pytest.raises(record.RecordError) as caught:
            make(**change)
        assert caught.value.reason in {"InvalidName", "InvalidField"}


@pytest.mark.parametrize(
    "change",
    [
        {"record_id": "x" * (record.MAX_ID_CHARS + 1)},
        {"record_id": "with space"},
        {"record_id": b"task:1:0"},
        {"tokens_in": -1},
        {"tokens_out": record.MAX_TOKENS + 1},
        {"tokens_out": False},
        {"tokens_in": 1.0},
        {"source": "cron"},
        {"source": ["task"]},
        {"conversation": ""},
        {"conversation": "c" * (record.MAX_TEXT_CHARS + 1)},
        {"conversation": "tab\there"},
        {"conversation": 7},
    ],
)
def test_a_record_of_names_that_passed_is_still_refused_for_any_other_field(
    change: dict[str, object],
) -> None:
    make()  # its names remembered: the record below takes the quick test first
    with pytest.raises(record.RecordError) as caught:
        make(**change)
    assert caught.value.reason == "InvalidField"
    assert make(conversation="c" * record.MAX_TEXT_CHARS).conversation is not None
    assert make(record_id="r" * record.MAX_ID_CHARS, tokens_out=record.MAX_TOKENS).tokens_in == 120


def test_the_quick_test_of_ids_and_conversations_agrees_with_their_patterns() -> None:
    # A record whose names passed takes one combined test (`check`) written without the
    # regular expressions the field-by-field checks use: both accept the same strings.
    make()
    chars = [chr(c) for c in range(0x180)] + ["\u2028", "\ufeff", "é", "∞", "\U0001f600"]
    for ch in chars:
        for text in (ch, f"a{ch}b"):
            for field, pattern in (("record_id", r"[!-~]{1,200}"), ("conversation", None)):
                if pattern is None:
                    ok = re.fullmatch(r"[^\x00-\x1f\x7f]{1,256}", text) is not None
                else:
                    ok = re.fullmatch(pattern, text) is not None
                try:
                    make(**{field: text})
                except record.RecordError:
                    accepted = False
                else:
                    accepted = True
                assert accepted == ok, (field, text)
