#!/usr/bin/env bash
# The whole test suite on a fresh machine: makes .venv, installs kmsenv with its test tools,
# then lint, types, tests. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k blob`).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e '.[test,bench]'

echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy --strict"
.venv/bin/mypy
# Tests talk only to loopback: never let the Alibaba credential chain query the ECS metadata service.
export ALIBABA_CLOUD_ECS_METADATA_DISABLED=true
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
