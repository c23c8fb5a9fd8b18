#!/usr/bin/env bash
# Set up labelless on a fresh machine: Fashion-MNIST (Debian package), a virtualenv in
# .venv with PyTorch, and labelless itself with its demo, ONNX and test extras.
# Idempotent: a second run only checks. Override the PyTorch pin with LABELLESS_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."

torch_pin=${LABELLESS_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
data=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$data" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: cannot install dataset-fashion-mnist without root; set LABELLESS_DATA to a Fashion-MNIST folder" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/pip install -q $torch_pin
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import labelless, torch; print(f'setup: labelless {labelless.__version__}, torch {torch.__version__}')"
