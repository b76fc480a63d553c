"""A module imported when one of its names is first read, not when its user is.

For large optional SDKs (Stripe's is ~9 MiB resident, 200 modules) that a process
loads only if it is configured to use them: the operator imports the billing code
whether or not any Tenant bills. Use it as

    if TYPE_CHECKING:
        import stripe
    else:
        stripe = lazy.module("stripe")

so type checkers see the real module and the code reads `stripe.X` as before.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _Module:
    __slots__ = ("_name", "_real")

    def __init__(self, name: str) -> None:
        self._name = name
        self._real: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._real is None:
            self._real = importlib.import_module(self._name)
        return getattr(self._real, attr)

    def __repr__(self) -> str:
        state = "imported" if self._real is not None else "not imported yet"
        return f"<lazy module {self._name!r}, {state}>"


def module(name: str) -> Any:
    """A stand-in for module `name` that imports it on the first attribute read."""
    return _Module(name)
