#!/usr/bin/env bash
# Set up advfeat for development on a fresh machine: CPU PyTorch first (a plain `pip install torch` would
# pull gigabytes of CUDA packages), then the package in editable mode with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
