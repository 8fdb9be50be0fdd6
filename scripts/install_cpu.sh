#!/usr/bin/env bash
# Create .venv (Python 3.10+) with verl_omni and its CPU stack. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: any other version pulls a multi-GB CUDA build on a CPU machine.
.venv/bin/python -m pip install -q torch==2.13.0
# Editable, so tests and Ray workers import this checkout. setuptools warns on every editable install that a folder
# named like the package may shadow it (here it is the package): silence that one module's warnings.
PYTHONWARNINGS="ignore:::setuptools.command.editable_wheel" .venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip check
.venv/bin/python -c "import verl_omni, torch, diffusers, verl; print('verl_omni ready: torch', torch.__version__, 'diffusers', diffusers.__version__, 'verl', verl.__version__)"
