#!/usr/bin/env bash
# Create .venv and install moedeploy with its test dependencies, at exactly the versions in
# requirements.lock (the ones the suite last passed on; scripts/lock.sh refreshes it). Idempotent: a no-op
# while pyproject.toml and the lock are unchanged. Installer output goes to .venv/setup.log, named on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "moedeploy needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.moedeploy-installed
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! requirements.lock -nt "$stamp" ]; then
  exit 0
fi
log=.venv/setup.log
echo "moedeploy: setting up .venv from requirements.lock (log: $log)" >&2
install() {
  if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
    echo "moedeploy: set-up failed at 'pip install $*'; the installer's output is in $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
}
: >"$log"
# torch first, alone: the lock's torch==2.13.0 is the local CPU wheel on the project's machines, and pip
# would otherwise pick a multi-GB CUDA build while resolving the rest.
install "$(grep '^torch==' requirements.lock)"
install -c requirements.lock -e ".[test]"
touch "$stamp"
