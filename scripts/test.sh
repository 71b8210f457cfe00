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

# Fuzz-target smoke run: each atheris target for a few seconds from its seeds (the hypothesis
# versions already ran above; long runs: docs/security.md). atheris comes with the test extra.
echo "== fuzz smoke (atheris, ${KMSENV_FUZZ_SECONDS:-3} s per target)"
smoke_log=$(mktemp)
# Every target run.py knows (a new target joins the smoke run without editing this list).
targets=$(.venv/bin/python tests/fuzz/run.py --list 2>"$smoke_log" | awk '{print $1}') || targets=
[ -n "$targets" ] || { cat "$smoke_log" >&2; echo "scripts/test.sh: error: no fuzz targets listed" >&2; exit 1; }
for target in $targets; do
  .venv/bin/python tests/fuzz/run.py "$target" --seconds "${KMSENV_FUZZ_SECONDS:-3}" >/dev/null 2>"$smoke_log" \
    || { cat "$smoke_log" >&2; rm -f "$smoke_log"; exit 1; }
done
rm -f "$smoke_log"

# Known vulnerabilities in the installed dependencies (PyPI's advisory data, over the network).
# Fatal when a vulnerability is reported; a network failure only warns (it must not make CI
# flaky), and packages PyPI does not know (a local mirror's builds) are listed as skipped.
# KMSENV_SKIP_PIP_AUDIT=1 skips it (offline machines).
if [ "${KMSENV_SKIP_PIP_AUDIT:-0}" != 1 ]; then
  echo "== pip-audit"
  .venv/bin/python -m pip install --quiet pip-audit >/dev/null
  if audit=$(.venv/bin/python -m pip_audit --progress-spinner off --skip-editable 2>&1); then
    echo "$audit" | head -1
  elif grep -qE "Found [0-9]+ known vulnerabilit" <<<"$audit"; then
    echo "$audit" >&2
    exit 1
  else
    echo "scripts/test.sh: warning: pip-audit could not check the dependencies (network?):" >&2
    echo "$audit" | tail -3 >&2
  fi
fi
