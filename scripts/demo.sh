#!/usr/bin/env bash
# The main job: install what is missing, then run `keepcount demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/keepcount demo "$@"
