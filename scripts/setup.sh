#!/usr/bin/env bash
# Set up advfeat for development on a fresh machine: CPU PyTorch first (a plain `pip install torch` would
# pull gigabytes of CUDA packages), then the package in editable mode with its dev tools, then torchattacks (a
# reference for the attack tests) without its requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# the reference port the tests compare attacks with; its own requirements would pull another torch
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps torchattacks==3.5.1 scipy requests
