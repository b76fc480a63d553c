"""Read the test bed's audit log: what the operator wrote, as the apiserver saw it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def entries(path: str | Path, *, since: int = 0) -> list[dict[str, Any]]:
    """Audit events written after byte offset `since`."""
    out: list[dict[str, Any]] = []
    try:
        with Path(path).open("rb") as fh:
            fh.seek(since)
            for raw in fh:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    continue  # a line being written right now
    except OSError:
        pass
    return out


def writes(
    path: str | Path, *, user: str, since: int = 0, namespace: str | None = None
) -> list[dict[str, Any]]:
    found = []
    for ev in entries(path, since=since):
        if ev.get("user", {}).get("username") != user or ev.get("verb") not in WRITE_VERBS:
            continue
        ref = ev.get("objectRef", {})
        if namespace is not None and ref.get("namespace") != namespace:
            continue
        found.append(ev)
    return found
