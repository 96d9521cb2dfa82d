#!/usr/bin/env bash
# Run the suite against both ends of the supported range, each in its own fresh venv, and say which
# versions each ran and whether it passed:
#   oldest  torch 2.11, transformers 5.17 (the GPU machine's image); the rest as pip resolves them
#   newest  the newest torch and transformers that pyproject.toml allows (and the newest of everything else)
#   scripts/test-range.sh [oldest|newest ...] [-- pytest args]
# PyPI's torch other than the local 2.13.0 wheel is a CUDA build (about 2.6 GB to download); it runs on the CPU.
# Installer output goes to .venv-<name>/setup.log; the suite's output to .venv-<name>/test.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
names=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do names+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#names[@]} -eq 0 ] && names=(oldest newest)

pins() {
  case $1 in
    oldest) echo "torch==2.11.0 transformers==5.17.0" ;;
    newest) echo "" ;;
    *) echo "test-range: unknown end '$1' (use oldest or newest)" >&2; exit 2 ;;
  esac
}

summary=()
status=0
for name in "${names[@]}"; do
  spec=$(pins "$name")
  venv=.venv-$name
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  log=$venv/setup.log
  echo "test-range: $name: installing ${spec:-the newest allowed versions} into $venv (log: $log)" >&2
  if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
         "$venv/bin/python" -m pip install --upgrade --upgrade-strategy eager $spec -e ".[test,bench]"; } >"$log" 2>&1; then
    echo "test-range: $name: install failed; see $log" >&2
    summary+=("$name: install failed (see $log)"); status=1; continue
  fi
  versions=$("$venv/bin/python" -c 'import sys, torch, transformers, accelerate; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")')
  echo "test-range: $name: running the suite on $versions" >&2
  HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error "$venv/bin/python" -m pytest -p no:cacheprovider "$@" tests \
    >"$venv/test.log" 2>&1
  rc=$?
  result=$(tail -n 1 "$venv/test.log")
  [ $rc -eq 0 ] || status=1
  summary+=("$name: $versions: $([ $rc -eq 0 ] && echo passed || echo FAILED) ($result)")
done
printf '%s\n' "${summary[@]}"
exit $status
