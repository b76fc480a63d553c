"""Kubernetes-shaped conditions: one setter that moves lastTransitionTime only on a flip."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


class Cond(NamedTuple):
    """A condition as decided by a policy: no timestamps yet."""

    type: str
    status: str
    reason: str
    message: str


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    previous: Iterable[Mapping[str, Any]] | None,
    decided: Iterable[Cond],
    *,
    generation: int | None,
    timestamp: str | None = None,
) -> list[dict[str, Any]]:
    """The new conditions list: `decided` in order, old ones of other types kept.

    `lastTransitionTime` is kept from the previous condition of the same type unless
    its status changed, so "since when" stays true across unchanged passes.
    """
    stamp = timestamp or now()
    old = {c.get("type"): c for c in previous or []}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cond in decided:
        prev = old.get(cond.type)
        since = stamp
        if prev is not None and prev.get("status") == cond.status:
            since = prev.get("lastTransitionTime", stamp)
        item: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since,
        }
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
        seen.add(cond.type)
    out.extend(dict(c) for t, c in old.items() if t not in seen and t is not None)
    return out


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None
