#!/usr/bin/env bash
# The test suite, on a fresh machine or an existing checkout (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
