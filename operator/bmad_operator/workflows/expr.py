"""The language of ``spec.steps[].condition``: CEL, evaluated over the run's state.

Why CEL: it is the expression language Kubernetes users already write (CRD
validation rules, ValidatingAdmissionPolicy), it is side-effect free, cannot loop
forever and is small enough to read in a manifest. We evaluate it with cel-python
(import name ``celpy``), a maintained pure-Python implementation of the CEL spec.

A condition sees these variables, and nothing else:

``inputs``     spec.inputs, as written (a map)
``outputs``    ``outputs['<step id>'].<name>``: the small values earlier steps reported
``steps``      ``steps['<step id>']``: the phase of every step ("Succeeded", "Skipped", ...)
``artifacts``  the names of the artifacts that exist so far (a list)
``item``       the item of a repeated step, or "" for a step that does not repeat

A condition must be a boolean expression. Names other than these five (BMAD writes
bare words such as ``user_wants_ux``) are refused when the workflow is checked,
with a message that shows the CEL spelling (``has(inputs.user_wants_ux) &&
inputs.user_wants_ux``); a missing key or a type mismatch while evaluating is an
:class:`ExpressionError` too, which the engine reports on the step.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bmad_integrations import lazy

if TYPE_CHECKING:
    import celpy
    import lark
    from celpy import adapter, celparser, celtypes, evaluation
else:  # imported when a Workflow's condition is first compiled or evaluated
    celpy = lazy.module("celpy")
    lark = lazy.module("lark")
    adapter = lazy.module("celpy.adapter")
    celparser = lazy.module("celpy.celparser")
    celtypes = lazy.module("celpy.celtypes")
    evaluation = lazy.module("celpy.evaluation")


VARIABLES = ("inputs", "outputs", "steps", "artifacts", "item")
# Macros that bind a variable of their own: list.all(x, ...), map.exists(k, ...).
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Small values a step may report for later conditions are stored in the status as
# strings; these spellings come back as booleans and integers.
OutputValue = bool | int | str


class ExpressionError(ValueError):
    """A condition that does not parse, names an unknown variable or fails to evaluate."""


def _identifiers(tree: lark.Tree[Any]) -> tuple[set[str], set[str]]:
    """(names used as variables, names bound by macros) in a parsed expression."""
    used: set[str] = set()
    bound: set[str] = set()
    for node in tree.iter_subtrees():
        if node.data == "primary" and node.children:
            child = node.children[0]
            if isinstance(child, lark.Tree) and child.data == "ident":
                used.add(str(child.children[0]))
        if node.data == "member_dot_arg" and len(node.children) >= 3:
            method, args = node.children[1], node.children[2]
            if str(method) in _BINDING_MACROS and isinstance(args, lark.Tree) and args.children:
                first = args.children[0]
                names = [
                    str(t.children[0])
                    for t in first.iter_subtrees()
                    if isinstance(first, lark.Tree) and t.data == "ident"
                ]
                if len(names) == 1:
                    bound.add(names[0])
    return used, bound


def is_identifier(name: str) -> bool:
    """Whether ``name`` can follow a dot in CEL (``outputs['step'].name``)."""
    return _IDENTIFIER.fullmatch(name) is not None


def _suggestion(name: str) -> str:
    if _IDENTIFIER.fullmatch(name):
        return f" (for an input, write has(inputs.{name}) && inputs.{name})"
    return ""


@functools.lru_cache(maxsize=1024)
def compile_condition(expression: str) -> celpy.Runner:
    """Parse and check ``expression``; the result evaluates it (cached per text)."""
    env = celpy.Environment()
    try:
        ast = env.compile(expression)
    except celparser.CELParseError as exc:
        detail = " ".join(str(exc).split())
        raise ExpressionError(f"is not a valid CEL expression: {detail}") from None
    used, bound = _identifiers(ast)
    unknown = sorted(used - bound - set(VARIABLES))
    if unknown:
        name = unknown[0]
        raise ExpressionError(
            f"names {name!r}, which is not a variable of conditions "
            f"({', '.join(VARIABLES)}){_suggestion(name)}"
        )
    return env.program(ast)


def check(expression: str) -> str | None:
    """Why ``expression`` cannot be a condition, or None when it can."""
    try:
        compile_condition(expression)
    except ExpressionError as exc:
        return str(exc)
    return None


def evaluate(
    expression: str,
    *,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Mapping[str, OutputValue]],
    steps: Mapping[str, str],
    artifacts: Sequence[str],
    item: str = "",
) -> bool:
    """The value of a condition; :class:`ExpressionError` when it is not a boolean."""
    program = compile_condition(expression)
    activation = {
        "inputs": adapter.json_to_cel(dict(inputs)),
        "outputs": adapter.json_to_cel({k: dict(v) for k, v in outputs.items()}),
        "steps": adapter.json_to_cel(dict(steps)),
        "artifacts": adapter.json_to_cel(list(artifacts)),
        "item": adapter.json_to_cel(item),
    }
    try:
        value = program.evaluate(activation)
    except evaluation.CELEvalError as exc:
        raise ExpressionError(f"could not be evaluated: {_eval_message(exc)}") from None
    if isinstance(value, evaluation.CELEvalError):
        raise ExpressionError(f"could not be evaluated: {_eval_message(value)}")
    if not isinstance(value, celtypes.BoolType):
        raise ExpressionError(
            f"evaluated to {type(value).__name__.removesuffix('Type').lower()} "
            f"{value!s}, not a boolean: compare it, for example == true"
        )
    return bool(value)


def _eval_message(exc: evaluation.CELEvalError) -> str:
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def encode_output(value: OutputValue) -> str:
    """How an output value is kept in the status (a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def decode_output(text: str) -> OutputValue:
    """An output value as conditions see it: "true"/"false" and integers come back typed."""
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?[0-9]{1,18}", text):
        return int(text)
    return text
