#!/usr/bin/env bash
# The whole test suite on a fresh machine: makes .venv, installs kmsenv with its test tools,
# then lint, types, tests. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k blob`).
set -euo pipefail
cd "$(dirname "$0")/.."

# The PostgreSQL store's tests start throwaway PostgreSQL servers of their own (tests/pg_harness.py)
# and need the server binaries of Debian's postgresql package: installed here when missing, since
# those tests never skip. (As root, the tests run the servers as the package's `postgres` user.)
have_postgresql() {
  for bin in /usr/lib/postgresql/*/bin; do
    if [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ]; then return 0; fi
  done
  command -v initdb >/dev/null && command -v pg_ctl >/dev/null
}
if ! have_postgresql; then
  echo "== installing PostgreSQL (Debian package postgresql) for the store tests"
  if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=()
  elif command -v sudo >/dev/null; then
    AS_ROOT=(sudo)
  else
    echo "scripts/test.sh: error: PostgreSQL is not installed; run: apt-get install postgresql (as root)" >&2
    exit 1
  fi
  "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

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
