#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite: unit and property tests, doctests, docs and examples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest "$@"
