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
# uv installs the same packages in seconds where pip takes a minute (the first thing a new user waits for).
# It does not read pip's configuration, so pip's configured find-links, index URLs and constraints are
# handed to it; if uv cannot be had or fails, pip does the install as before. ALIGN_INSTALLER=pip: pip only.
uv_args() {  # pip's configured sources as uv options, one per line
  .venv/bin/python -m pip config list 2>/dev/null | .venv/bin/python -c '
import shlex, sys
flags = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "constraint": "--constraint"}
seen = []
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    for part in " ".join(shlex.split(value)).split() if flag else []:
        if (flag, part) not in seen:
            seen.append((flag, part))
            print(flag, part, sep="\n")'
}
install_with_uv() {
  [ "${ALIGN_INSTALLER:-uv}" = "uv" ] || return 1
  .venv/bin/python -m pip install -q uv >/dev/null 2>&1 || return 1
  local args
  mapfile -t args < <(uv_args)
  [ -z "${TORCH_INDEX_URL:-}" ] || args+=(--extra-index-url "$TORCH_INDEX_URL")
  args+=(--index-strategy unsafe-best-match)  # pip's rule: the best version across every index
  .venv/bin/python -m uv pip install -q --python .venv/bin/python "${args[@]}" "$TORCH_SPEC" -e ".[$EXTRAS]"
}
if install_with_uv; then
  echo "[setup] installed with uv"
else
  # torch first, pinned, so that nothing below pulls a different (CUDA) build
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX_URL"
  else
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
  fi
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
fi
echo "$want" > "$stamp"
echo "[setup] .venv ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
