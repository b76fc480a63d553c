"""The runtime's import contracts hold, and they can fail.

Each case copies the runtime package into a temporary folder, adds one import that
points the wrong way, and runs ``lint-imports`` on the copy with the runtime's
contracts from pyproject.toml: the linter must name the broken contract. The
unchanged copy must pass, so a failure is the added import's doing. Also: no module
of the runtime is a test aid (named fake or test), and none imports one.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import pytest

pytestmark = pytest.mark.unit

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = REPO / "runtime" / "bmad_runtime"
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")


def runtime_contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return [c for c in contracts if c["name"].startswith("Runtime")]


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def write_config(path: pathlib.Path) -> None:
    lines = ["[tool.importlinter]", 'root_packages = ["bmad_runtime"]', ""]
    for contract in runtime_contracts():
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in contract.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def lint(tmp_path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "contracts.toml"
    write_config(config)
    # The copy comes first on the path, before the editable install of the real one.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "COLUMNS": "500"}
    return subprocess.run(
        [str(LINT_IMPORTS), str(config), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.fixture
def copy(tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "src" / "bmad_runtime"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_runtime_contracts_are_declared() -> None:
    names = [c["name"] for c in runtime_contracts()]
    assert any("layers" in name.lower() for name in names)
    assert len(names) >= 3


def test_the_unchanged_copy_keeps_every_contract(copy: pathlib.Path) -> None:
    result = lint(copy.parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


BACK_IMPORTS = [
    pytest.param(
        "turns.py", "from bmad_runtime.api import deps\n", "Runtime layers", id="use-case->api"
    ),
    pytest.param(
        "api/routes/health.py",
        "\n\ndef _app() -> object:\n    from bmad_runtime import app\n\n    return app\n",
        "Runtime layers",
        id="route->app, function-local",
    ),
    pytest.param(
        "memory/store.py", "from bmad_runtime import turns\n", "Runtime layers", id="memory->turns"
    ),
    pytest.param(
        "bus/client.py",
        "from bmad_runtime.bus import consumer\n",
        "Runtime task bus",
        id="client->consumer",
    ),
    pytest.param(
        "memory/scope.py",
        "from bmad_runtime.memory import conversations\n",
        "Runtime memory",
        id="scope->conversations",
    ),
]


@pytest.mark.parametrize(("module", "line", "contract"), BACK_IMPORTS)
def test_a_back_import_breaks_a_contract(
    copy: pathlib.Path, module: str, line: str, contract: str
) -> None:
    path = copy / module
    path.write_text(path.read_text() + line)

    result = lint(copy.parent.parent)

    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith(" BROKEN")]
    assert len(broken) == 1, result.stdout
    assert broken[0].startswith(contract), result.stdout
    importer = "bmad_runtime." + module.removesuffix(".py").replace("/", ".")
    assert f"- {importer} -> " in result.stdout


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_runtime_module_is_a_test_aid() -> None:
    aids = [p for p in _modules() if "fake" in p.stem or "test" in p.stem]
    assert aids == []


def test_no_runtime_module_imports_a_test_aid() -> None:
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(alias.name for alias in node.names)]
            parts = [part for name in names for part in name.split(".")]
            if any("fake" in part or part.startswith("test") for part in parts):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


MAX_MODULE_LINES = 450


def test_no_runtime_module_is_longer_than_450_lines() -> None:
    """Issue 9: a module that outgrows this holds more than one concern: split it by role
    (as bus/outcomes.py and jwks.py were split from the consumer and auth)."""
    lengths = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, too_long
    assert lengths  # the package was found
