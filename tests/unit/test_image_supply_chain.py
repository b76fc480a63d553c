"""The image is built from what was reviewed: a base pinned by digest, every dependency
pinned and checked by hash, and no dependency version with a known advisory we fixed.

Issue 10, hole 12. Before the change these failed: the Dockerfile's base was
`python:3.11-slim` (a moving tag), pip resolved the dependencies afresh on each build,
and pyproject.toml allowed python-jose 3.3 (CVE-2024-33663, CVE-2024-33664).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "image.lock"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)")


def _locked() -> dict[str, tuple[Version, int]]:
    """name -> (version, number of hashes) from the lock file."""
    found: dict[str, tuple[Version, int]] = {}
    current: str | None = None
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            found[current] = (Version(match.group(2)), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
        elif not line.startswith(" "):
            current = None
    return found


def _dependencies() -> list[Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def test_hole12_base_image_is_pinned_by_digest() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base is not None, "the Dockerfile has no default BASE_IMAGE"
    assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base.group(1)), base.group(1)


def test_hole12_every_dependency_is_locked_with_hashes_and_installed_by_them() -> None:
    locked = _locked()
    assert locked, f"{LOCK} lists nothing"
    for name, (version, hashes) in locked.items():
        assert hashes >= 1, f"{name}=={version} has no --hash in {LOCK.name}"
    for req in _dependencies():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is a dependency but not in {LOCK.name}: re-lock"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} has {req.name}=={version}, outside pyproject's {req.specifier}: re-lock"
        )
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements/image.lock" in dockerfile
    # The project's own wheel brings nothing else in.
    assert "pip wheel --no-deps" in dockerfile


def test_hole12_python_jose_cannot_be_a_version_with_known_advisories() -> None:
    jose = next(r for r in _dependencies() if canonicalize_name(r.name) == "python-jose")
    # 3.3.0: CVE-2024-33663 (algorithm confusion with OpenSSH ECDSA keys) and
    # CVE-2024-33664 (JWE decompression bomb), both fixed in 3.4.0.
    assert not jose.specifier.contains("3.3.0")
    assert _locked()["python-jose"][0] >= Version("3.4.0")
