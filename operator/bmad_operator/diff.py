"""Does a live object already hold everything we would apply? (If so, apply nothing.)

Server-side apply is idempotent but it is still a write: a resync of a thousand
unchanged Agents must not send a thousand PATCHes. So before applying we check that
every field of the built object is present, with the same value, in the live one.
Fields the API server adds (defaults, status, managedFields) are ignored; quantities
are compared by value ("0.5" is "500m").
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_SUFFIX = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)$")


def quantity(value: Any) -> Decimal | None:
    """The numeric value of a Kubernetes quantity, or None if it is not one."""
    match = _QUANTITY.match(str(value))
    if not match:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return None


# Maps whose values are quantities (container resources, quota and limit-range maps).
QUANTITY_MAPS = frozenset(
    {
        "requests",
        "limits",
        "hard",
        "default",
        "defaultRequest",
        "max",
        "min",
        "capacity",
        "allocatable",
    }
)


def _scalar_equal(live: Any, want: Any, *, quantities: bool) -> bool:
    if live == want and type(live) is type(want):
        return True
    if isinstance(want, bool) or isinstance(live, bool):
        return False
    if isinstance(want, (int, str)) and isinstance(live, (int, str)):
        # int-or-string fields (ports, maxUnavailable) come back in either form.
        if str(live) == str(want):
            return True
        if quantities:
            a, b = quantity(live), quantity(want)
            return a is not None and a == b
    return False


def covers(live: Any, want: Any, *, quantities: bool = False) -> bool:
    """Whether `live` contains `want`: dicts by key, lists item by item, scalars equal.

    Values are compared as quantities ("0.5" is "500m") only inside resource maps:
    elsewhere "1.10" and "1.1" are different strings.
    """
    if isinstance(want, dict):
        if not isinstance(live, dict):
            return False
        return all(
            k in live and covers(live[k], v, quantities=quantities or k in QUANTITY_MAPS)
            for k, v in want.items()
        )
    if isinstance(want, list):
        if not isinstance(live, list) or len(live) != len(want):
            return False
        return all(covers(a, b) for a, b in zip(live, want, strict=True))
    return _scalar_equal(live, want, quantities=quantities)


def needs_apply(live: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    if live is None:
        return True
    if live.get("metadata", {}).get("deletionTimestamp"):
        return True
    want_meta = want.get("metadata", {})
    live_meta = live.get("metadata", {})
    for key in ("labels", "annotations"):
        if not covers(live_meta.get(key, {}), want_meta.get(key, {})):
            return True
    live_refs = {r.get("uid") for r in live_meta.get("ownerReferences", [])}
    if any(r.get("uid") not in live_refs for r in want_meta.get("ownerReferences", [])):
        return True
    body = {k: v for k, v in want.items() if k not in ("apiVersion", "kind", "metadata")}
    return not covers(live, body)
