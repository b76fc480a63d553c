"""The operator's import contracts (pyproject.toml, ids `operator-*`) hold, and break.

Each case copies `bmad_operator` into a temporary folder, adds one deliberate
back-import there (never in the repository), and runs `lint-imports` on the copy with
the repository's own configuration: the named contract must fail, naming the import.
The unmodified copy passes, so a failure is the added import's doing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CONTRACTS = (
    "operator-layers",
    "operator-pure",
    "operator-builders",
    "operator-reconcilers",
    "operator-policies",
)


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(
        REPO / "operator" / "bmad_operator",
        tmp_path / "bmad_operator",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # The copy comes first on the path, so it is the bmad_operator the linter reads;
    # the other packages come from the installed project.
    env = dict(os.environ, PYTHONPATH=str(root))
    args = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    args.append(str(root / "pyproject.toml"))
    for contract in CONTRACTS:
        args += ["--contract", contract]
    return subprocess.run(
        args, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_operator_contracts_hold_on_an_unmodified_copy(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


# (module to write or extend, the import added, words of the contract it breaks)
BACK_IMPORTS = {
    "builder->reconciler": (
        "builders/shortcut.py",
        "from bmad_operator.reconcilers import agent",
        "Operator layers:",
    ),
    "policy->client": (
        "policies/shortcut.py",
        "from bmad_operator import kube",
        "policies are pure",
    ),
    "errors->queue": ("errors.py", "from bmad_operator import workqueue", "Operator layers:"),
    "common->reconciler": (
        "reconcilers/common.py",
        "from bmad_operator.reconcilers import tenant",
        "Operator reconcilers:",
    ),
    "meta->agent-builder": (
        "builders/meta.py",
        "from bmad_operator.builders import agent",
        "Operator builders:",
    ),
    "policy->policy": (
        "policies/agent.py",
        "from bmad_operator.policies import tenant",
        "Operator policies:",
    ),
}


@pytest.mark.parametrize(
    ("module", "line", "contract"), BACK_IMPORTS.values(), ids=list(BACK_IMPORTS)
)
def test_a_deliberate_back_import_fails_the_linter(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    root = _copy(tmp_path)
    path = root / "bmad_operator" / module
    before = path.read_text() if path.exists() else '"""A deliberate back-import."""\n'
    path.write_text(f"{before}\n{line}  # deliberate back-import\n")
    result = _lint(root)
    assert result.returncode != 0, result.stdout
    text = " ".join(result.stdout.split())  # the linter wraps long contract names
    verdict = re.search(re.escape(contract) + r"(?:(?! KEPT| BROKEN).)* (KEPT|BROKEN)", text)
    assert verdict is not None, result.stdout
    assert verdict.group(1) == "BROKEN", result.stdout
    importer = ".".join(("bmad_operator", *Path(module).with_suffix("").parts))
    assert importer in result.stdout, result.stdout
