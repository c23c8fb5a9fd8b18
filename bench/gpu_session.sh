#!/usr/bin/env bash
# The GPU checks, as one script for the device tool (one H100/H200, torch 2.11, no network).
# Here first:  .venv/bin/python bench/paper.py --prepare-data .carry/data   (about 35 MB; .carry is git-ignored)
# Then the device tool's run, with carry [".carry"] and a timeout of about 540 s:
#   bash bench/gpu_session.sh
# Results land in $OUT: paper.json (the table's rows), sweep-*.{csv,json,png}, sweep_bench.json, logs.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 LABELLESS_PROGRESS=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# 1. the sweep speed target: ResNet-50, 32 px, 9 values of k, 10,000 images, <= 60 s
timeout 120 python3 bench/sweep.py --model resnet50 --small-input --image-size 32 --images 10000 \
  --out "$OUT/sweep_bench.json" > "$OUT/sweep_bench.log" 2>&1
# 2. the paper-scale experiment, cut off by its own time limit so that its rows come back
timeout 420 python3 bench/paper.py --data .carry/data --out "$OUT" --time-limit 360 2>&1 | tee "$OUT/paper.log" | tail -n 40
