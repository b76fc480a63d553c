"""How a runtime process sets up Python's garbage collector (docs/runtime.md).

CPython frees most objects by reference counting; the cyclic collector only looks for
reference cycles, and by default it runs a young collection every 700 net allocations
of container objects, examining every young object still alive. A request that waits
on I/O (the usage ledger's append, PostgreSQL, Redis, a model) keeps its objects alive
across those collections, so under concurrency most young collections find nothing to
free but examine every waiting request's objects and move them to older generations,
where they make the full collections, which also walk the whole heap, come sooner. On
this project's test machine the in-process runtime with the ledger on spent 71 µs a
request in 1,432 collections over concurrency 1, 16 and 64, against 13-16 µs with the
ledger off; set up as below, 0-1 µs in 5-6 collections (`bench/ledger_cost.py`,
docs/benchmarks.md).

`tune` does two things, once, before serving:
- it collects and then freezes what exists (the imported modules, their classes and
  pydantic's schemas, the app): those objects are never examined again;
- it makes young collections rarer (every ``young_threshold`` net allocations instead
  of 700); the older generations keep Python's ratios.
Reference cycles are still freed, later: each young collection examines more objects,
and there are far fewer of them.
"""

from __future__ import annotations

import gc

DEFAULT_YOUNG_THRESHOLD = 10_000


def tune(young_threshold: int = DEFAULT_YOUNG_THRESHOLD) -> bool:
    """Freeze what exists and set the young generation's threshold; 0 changes nothing.

    Returns whether anything was changed.
    """
    if young_threshold < 0:
        raise ValueError("the young generation's threshold is 0 (Python's) or more")
    if young_threshold == 0:
        return False
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
    return True
