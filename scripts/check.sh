#!/usr/bin/env bash
# The project's checks, as CI runs them (after scripts/install_cpu.sh): ruff lint, ruff format, the CPU tests.
#   bash scripts/check.sh                      everything (what CI runs)
#   bash scripts/check.sh -m "not gpu and not e2e"   the fast inner loop (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ $# -eq 0 ]; then set -- -m "not gpu"; fi
.venv/bin/python -m pytest "$@" tests
