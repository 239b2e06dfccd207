#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh --test) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh --test
exec "$PYTHON" -m pytest tests/ -q "$@"
