"""Put a bench's results into docs/benchmarks.md under its own section, not at the end."""

from __future__ import annotations

from pathlib import Path


def add_to_section(path: Path, heading: str, text: str) -> None:
    """Insert `text` at the end of the `## heading` section (before the next `## `), or
    append the section to the file if it has none."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"## {heading}"), None)
    if start is None:
        body = "".join(lines).rstrip("\n")
        path.write_text((body + "\n\n" if body else "") + f"## {heading}\n" + text)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "".join(lines[:end]).rstrip("\n") + "\n"
    after = "".join(lines[end:])
    path.write_text(before + text.rstrip("\n") + "\n" + ("\n" + after if after else ""))
