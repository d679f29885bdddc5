#!/usr/bin/env bash
# The whole test suite: install what is missing, lint and type-check, then
# run unit, integration (real servers) and system (real processes, SIGKILL)
# tests.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy
exec .venv/bin/pytest "$@"
