#!/usr/bin/env bash
# Set up (if needed), check the import layering and lint, and run the test suite.
# Extra arguments go to pytest (e.g. -k sft, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest tests "$@"
