#!/usr/bin/env bash
# The built-in default end to end: train a compact model on Fashion-MNIST, sweep, search,
# quantize, retrain it label-free on MNIST digits, and report (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/labelless run "$@"
