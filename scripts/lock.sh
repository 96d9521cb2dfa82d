#!/usr/bin/env bash
# Refresh requirements.lock: install the newest versions that pyproject.toml's ranges allow into a fresh
# venv (.venv-lock), run the suite there, and write the lock only if it passes. torch stays at the
# machine's wheel ($TORCH, default 2.13.0: any other version downloads a CUDA build here); the newest torch
# is tested by scripts/test-range.sh. Afterwards ./scripts/test.sh reinstalls .venv from the new lock.
#   scripts/lock.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
venv=.venv-lock
rm -rf "$venv"
"$PY" -m venv "$venv"
log=$venv/setup.log
echo "lock: installing the newest allowed versions into $venv (log: $log)" >&2
if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
       echo "torch==$TORCH" >"$venv/torch.txt" &&
       "$venv/bin/python" -m pip install -c "$venv/torch.txt" --upgrade --upgrade-strategy eager -e ".[test,bench]"
     } >"$log" 2>&1; then
  echo "lock: install failed; see $log" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
versions=$("$venv/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')
echo "lock: running the suite on $versions" >&2
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error "$venv/bin/python" -m pytest -p no:cacheprovider "$@" tests
{
  echo "# The versions the test suite last passed on ($versions), written by scripts/lock.sh on $(date -u +%F)."
  echo "# scripts/setup.sh installs exactly these; pyproject.toml keeps the wide ranges for pip users."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)==' | sed -E 's/^torch==([^+]*)\+.*/torch==\1/'
} >requirements.lock.new
mv requirements.lock.new requirements.lock
echo "lock: requirements.lock updated; commit it with the suite's result" >&2
