#!/usr/bin/env bash
# Set up (if needed) and run the main job: greedy generation with moedeploy, printing text and stats.
# Until the embedded demo model ships, it builds a tiny random Mixtral-architecture checkpoint first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
model=out/tiny-mixtral
if [ ! -f "$model/config.json" ]; then
  .venv/bin/moedeploy make-tiny --family mixtral --out "$model" >/dev/null
fi
exec .venv/bin/moedeploy generate --model "$model" --prompt "${1:-Only the hot experts}" --max-new-tokens 32 --json
