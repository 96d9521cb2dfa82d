#!/usr/bin/env bash
# Set up (if needed) and run the main job: greedy generation with moedeploy, printing text and stats.
# The model is the embedded demo model (docs/demo-model.md); pass a prompt as the first argument.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
# Half of the expert bytes resident (LRU): outputs are identical to the unbudgeted run, and stats.cache
# shows the hits, misses, bytes moved and stall time.
exec .venv/bin/moedeploy generate --prompt "${1:-ROMEO.}" --max-new-tokens 48 --expert-memory 0.5 --json
