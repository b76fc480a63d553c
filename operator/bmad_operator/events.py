"""An event a policy decided to post: its type, a constant CamelCase reason, a sentence.

Policies return these; the reconcilers post them with `kube.Kube.event`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

NORMAL: Literal["Normal"] = "Normal"
WARNING: Literal["Warning"] = "Warning"


class Event(NamedTuple):
    type: Literal["Normal", "Warning"]
    reason: str
    message: str
