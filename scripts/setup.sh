#!/usr/bin/env bash
# Create .venv at the repository root if missing and install align with its dev extras.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
#   TORCH_SPEC   what to pip-install for torch first (default: torch==2.13.0, the CPU build here).
#                On a CUDA machine: TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#   TORCH_INDEX_URL  optional extra index for torch wheels.
#   ALIGN_EXTRAS  extras to install (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${ALIGN_EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=".venv/.align-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned, so that nothing below pulls a different (CUDA) build
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "[setup] .venv ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
