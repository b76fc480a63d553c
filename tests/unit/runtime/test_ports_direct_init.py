"""`ports.direct_init`: the turn's records made without ``object.__setattr__`` per field,
and still what ``@dataclass(frozen=True)`` made them (parameters, defaults, frozen)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect

import pytest

from bmad_runtime import ports, turns

pytestmark = pytest.mark.unit

WHEN = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class Plain:
    a: int
    b: str = "b"
    c: int = dataclasses.field(default=3, kw_only=True)


def test_the_same_parameters_defaults_and_keyword_only_fields_as_the_generated_init() -> None:
    @ports.direct_init
    @dataclasses.dataclass(frozen=True)
    class Same:
        a: int
        b: str = "b"
        c: int = dataclasses.field(default=3, kw_only=True)

    assert str(inspect.signature(Same)) == str(inspect.signature(Plain))
    assert dataclasses.astuple(Same(1)) == dataclasses.astuple(Plain(1)) == (1, "b", 3)
    assert dataclasses.astuple(Same(1, "x", c=4)) == (1, "x", 4)
    with pytest.raises(TypeError):
        Same(1, "x", 4)  # type: ignore[call-arg]  # c is keyword-only, as in Plain
    with pytest.raises(TypeError):
        Same()  # type: ignore[call-arg]


def test_a_record_stays_frozen_equal_and_hashable() -> None:
    turn = ports.Turn("c-1", "user", "hello", WHEN)
    assert turn == ports.Turn("c-1", "user", "hello", WHEN, model=None)
    assert hash(turn) == hash(ports.Turn("c-1", "user", "hello", WHEN))
    assert repr(turn).startswith("Turn(conversation_id='c-1', role='user'")
    with pytest.raises(dataclasses.FrozenInstanceError):
        turn.content = "changed"  # type: ignore[misc]
    assert dataclasses.replace(turn, model="m").model == "m"
    assert turn.model is None


def test_every_record_of_a_turn_is_made_so() -> None:
    for cls in (
        ports.Message,
        ports.Usage,
        ports.Completion,
        ports.Turn,
        ports.UsageRecord,
        ports.TurnRecord,
        ports.LedgerEntry,
        turns.Turn,
    ):
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "__dataclass_builtins_object__" not in cls.__init__.__code__.co_names


@pytest.mark.parametrize(
    "cls",
    [
        dataclasses.dataclass(type("Mutable", (), {"__annotations__": {"a": int}})),
        dataclasses.dataclass(frozen=True, slots=True)(
            type("Slotted", (), {"__annotations__": {"a": int}})
        ),
        dataclasses.dataclass(frozen=True)(
            type(
                "Factory",
                (),
                {"__annotations__": {"a": list}, "a": dataclasses.field(default_factory=list)},
            )
        ),
        dataclasses.dataclass(frozen=True)(
            type("PostInit", (), {"__annotations__": {"a": int}, "__post_init__": lambda _: None})
        ),
        type("NotADataclass", (), {}),
    ],
)
def test_a_class_it_cannot_make_so_is_refused(cls: type) -> None:
    with pytest.raises(TypeError, match="not a plain frozen dataclass"):
        ports.direct_init(cls)


def test_a_field_only_the_generated_init_takes_is_refused() -> None:
    initvar: type = dataclasses.dataclass(frozen=True)(
        type("WithInitVar", (), {"__annotations__": {"a": int, "b": dataclasses.InitVar[int]}})
    )
    with pytest.raises(TypeError, match="not a plain frozen dataclass"):
        ports.direct_init(initvar)
