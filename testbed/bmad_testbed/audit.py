"""Read the test bed's audit log: what the operator wrote, as the apiserver saw it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

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


class Mark(NamedTuple):
    """A place in the audit log that survives the apiserver rotating it
    (`--audit-log-maxsize`: the file is renamed to audit-<time>.log and a new one begun)."""

    path: Path
    inode: int
    offset: int


def mark(path: str | Path) -> Mark:
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return Mark(p, 0, 0)
    return Mark(p, st.st_ino, st.st_size)


def entries_after(start: Mark) -> list[dict[str, Any]]:
    """Audit events written after `start`, from the rotated file too if it was rotated."""
    current = mark(start.path)
    if start.inode in (current.inode, 0):
        return entries(start.path, since=start.offset)
    found: list[dict[str, Any]] = []
    for rotated in sorted(start.path.parent.glob(f"{start.path.stem}-*{start.path.suffix}")):
        try:
            if rotated.stat().st_ino == start.inode:
                found = entries(rotated, since=start.offset)
        except OSError:
            continue
    return found + entries(start.path)


def requests_by_verb(
    events: list[dict[str, Any]], *, user: str, leave_out: frozenset[str] = frozenset()
) -> Counter[str]:
    """How many requests `user` made, by verb, each request once (a watch has two stages).

    `leave_out` names resources not to count (such as `leases`, renewed every few seconds).
    """
    seen: dict[str, str] = {}
    for ev in events:
        if ev.get("user", {}).get("username") != user:
            continue
        if ev.get("objectRef", {}).get("resource") in leave_out:
            continue
        seen[str(ev.get("auditID"))] = str(ev.get("verb"))
    return Counter(seen.values())


def write_requests(
    events: list[dict[str, Any]], *, user: str, leave_out: frozenset[str] = frozenset()
) -> Counter[str]:
    """The writes `user` made, as 'verb resource[/subresource]' → count."""
    seen: dict[str, str] = {}
    for ev in events:
        if ev.get("user", {}).get("username") != user or ev.get("verb") not in WRITE_VERBS:
            continue
        ref = ev.get("objectRef", {})
        if ref.get("resource") in leave_out:
            continue
        what = str(ref.get("resource"))
        if ref.get("subresource"):
            what += "/" + str(ref["subresource"])
        seen[str(ev.get("auditID"))] = f"{ev.get('verb')} {what}"
    return Counter(seen.values())
