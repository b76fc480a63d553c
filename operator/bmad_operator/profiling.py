"""Heap profiling of a running operator, on demand: tracemalloc snapshots on SIGUSR1.

Off unless `BMAD_OPERATOR_TRACEMALLOC_DIR` names a folder. Then tracemalloc traces every
allocation (with `BMAD_OPERATOR_TRACEMALLOC_FRAMES` frames each; it roughly doubles the
memory and slows the operator, so never in production) and each SIGUSR1 writes one
snapshot, `tracemalloc-<pid>-<n>.snap`, into that folder (written under another name
and renamed, so a reader never sees half a file). Read one with
`python bench/heap.py <file>`. Allocations made before tracing starts (the imports)
are not in it unless the process is started with `PYTHONTRACEMALLOC=<frames>`.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

_counter = itertools.count(1)


def start(directory: str, *, frames: int) -> None:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        dump(folder)

    signal.signal(signal.SIGUSR1, on_signal)
    log.warning("tracemalloc is on (%d frames): SIGUSR1 writes a snapshot to %s", frames, folder)


def dump(folder: Path) -> Path:
    path = folder / f"tracemalloc-{os.getpid()}-{next(_counter)}.snap"
    partial = path.with_suffix(".partial")
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(partial))
    partial.rename(path)
    current, peak = tracemalloc.get_traced_memory()
    log.warning(
        "tracemalloc snapshot %s: %.1f MiB traced now, %.1f MiB at the peak",
        path,
        current / 2**20,
        peak / 2**20,
    )
    return path
