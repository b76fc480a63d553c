"""Where the memory of a tracemalloc snapshot went: top lines, top call sites, by package.

    .venv/bin/python bench/heap.py SNAPSHOT [--top 25] [--compare OLDER_SNAPSHOT]

Snapshots come from an operator started with `BMAD_OPERATOR_TRACEMALLOC_DIR` (see
`bmad_operator.profiling`; `bench/reconcile.py --tracemalloc-dir DIR` restarts the
operator traced once all Agents are Ready and takes one when it has caught up).
"By package" charges each allocation to the first frame (from the allocation outwards)
that is not in the standard library's json/copy/re modules, so `json.loads` called by
kopf counts as kopf's.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tracemalloc
from pathlib import Path

MiB = 2**20
PLAIN = re.compile(r"/(json|copy|re|enum|typing|functools|collections|abc|_weakrefset)/")


def package_of(filename: str) -> str:
    for marker, name in (
        ("/bmad_operator/", "bmad_operator"),
        ("/bmad_crds/", "bmad_crds"),
        ("/bmad_integrations/", "bmad_integrations"),
        ("/site-packages/", None),
    ):
        if marker in filename:
            if name:
                return name
            rest = filename.split("/site-packages/", 1)[1]
            return rest.split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in filename:
        return "stdlib:" + filename.rsplit("/", 1)[-1].removesuffix(".py")
    return filename


def by_package(snapshot: tracemalloc.Snapshot) -> list[tuple[str, int, int]]:
    sizes: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)  # most recent call first
        owner = next(
            (f.filename for f in frames if not PLAIN.search(f.filename)), frames[0].filename
        )
        entry = sizes[package_of(owner)]
        entry[0] += stat.size
        entry[1] += stat.count
    return sorted(((k, v[0], v[1]) for k, v in sizes.items()), key=lambda r: -r[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("snapshot", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compare", type=Path, help="an earlier snapshot: show growth")
    args = parser.parse_args()
    snap = tracemalloc.Snapshot.load(str(args.snapshot))
    snap = snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    total = sum(s.size for s in snap.statistics("filename"))
    print(f"traced: {total / MiB:.1f} MiB in {len(snap.traces):,} blocks\n")

    print("by package (allocation charged to the first frame outside json/copy/re/...):")
    for name, size, count in by_package(snap)[: args.top]:
        print(f"  {size / MiB:8.1f} MiB {100 * size / total:5.1f}%  {count:>9,}  {name}")

    print("\ntop lines:")
    for stat in snap.statistics("lineno")[: args.top]:
        frame = stat.traceback[0]
        print(f"  {stat.size / MiB:8.1f} MiB {stat.count:>9,}  {frame.filename}:{frame.lineno}")

    print("\ntop call sites (3 innermost frames outside json/copy/re/...):")
    sites: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for stat in snap.statistics("traceback"):
        frames = [f for f in stat.traceback if not PLAIN.search(f.filename)][:3]
        key = " <- ".join(
            f"{package_of(f.filename)}:{Path(f.filename).name}:{f.lineno}" for f in frames
        )
        sites[key][0] += stat.size
        sites[key][1] += stat.count
    for key, (size, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {size / MiB:8.1f} MiB {count:>9,}  {key}")

    if args.compare:
        old = tracemalloc.Snapshot.load(str(args.compare))
        print(f"\ngrowth since {args.compare.name}:")
        for diff in snap.compare_to(old, "lineno")[: args.top]:
            frame = diff.traceback[0]
            print(
                f"  {diff.size_diff / MiB:+8.1f} MiB {diff.count_diff:>+9,}  "
                f"{frame.filename}:{frame.lineno}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
