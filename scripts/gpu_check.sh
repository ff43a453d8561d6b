#!/usr/bin/env bash
# The single-GPU check (see scripts/gpu_check.py): bf16 SFT and DPO throughput and MFU on a SmolLM2-135M
# model, hf vs vllm rejection-sampling throughput, align's DPO vs TRL's in bf16. Under 10 minutes on an
# H100/H200. Needs a CUDA build of torch (scripts/setup.sh with TORCH_INDEX_URL, see there) and, for the
# vllm figure, `pip install -e '.[vllm]'`. Extra arguments go to gpu_check.py (e.g. --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --out "${GPU_CHECK_OUT:-gpu_check.json}" "$@"
