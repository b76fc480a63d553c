#!/usr/bin/env bash
# The test command: set up everything on a fresh machine, start the test bed, run
# every suite (unit, integration, e2e) plus the linters, and stop the test bed.
# The real-node suite (tests/e2e/realnode, marker realnode) brings up a second test
# bed with the real node, runs scripts/demo.sh in it, and stops it at the end.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash scripts/bootstrap.sh

echo "[test] lint: ruff, mypy --strict, import-linter, hadolint" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { echo "[test] ruff format would change files: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/mypy
.venv/bin/lint-imports --no-cache >/dev/null
.venv/bin/hadolint Dockerfile

export BMAD_TESTBED_DIR="${BMAD_TESTBED_DIR:-/tmp/bmad-testbed-$(id -u)}"
cleanup() { .venv/bin/bmad testbed down >/dev/null 2>&1 || true; }
trap cleanup EXIT
echo "[test] starting the test bed" >&2
set -a
eval "$(.venv/bin/bmad testbed up)"
set +a
export PATH="$BMAD_TESTBED_DIR/bin:$PATH"

rc=0
.venv/bin/pytest -m "unit or integration or e2e" "$@" || rc=$?
if [ $# -eq 0 ]; then
  # After the whole suite, on the same test bed: the operator's RBAC against every call
  # it made (the audit log), so a rule nothing used or a call no rule allows fails.
  echo "[test] the operator's RBAC against the audit log of this run" >&2
  .venv/bin/pytest -m rbac_audit tests/rbac || rc=$?
fi
echo "[test] finished in $(( $(date +%s) - started ))s" >&2
exit $rc
