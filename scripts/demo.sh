#!/usr/bin/env bash
# Set up (if needed) and run the default Llama 3 round on the built-in tiny model and data.
# Extra arguments are passed to `align run` (overrides such as seed=1 sft.train.max_steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/align run recipes/llama3_round.yaml "$@"
