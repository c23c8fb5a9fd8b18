#!/usr/bin/env bash
# What CutMix buys label-free retraining, and what its teacher passes cost: the demo's quantized
# model retrained label-free on 2,000 MNIST digits (as `labelless run` does) with CutMix off, or on
# a quarter or half of the batches (the teacher then runs on every mixed batch); 3 seeds each,
# scored on all 10,000 Fashion-MNIST test images. Needs a finished demo run (bash scripts/demo.sh)
# in RUN. One JSON per run in OUT; a rerun skips those there.
#   bash bench/cutmix.sh [RUN=runs/default] [OUT=docs/results/cutmix]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/default}
out=${2:-docs/results/cutmix}
mkdir -p "$out" /tmp/labelless-cutmix
variants=("off:--cutmix 0" "quarter:--cutmix 0.25" "half:--cutmix 0.5")
for seed in 0 1 2; do
  for variant in "${variants[@]}"; do
    name="${variant%%:*}-seed$seed"
    [[ -f "$out/$name.json" ]] && continue
    # shellcheck disable=SC2086  # the variant's flags are words
    .venv/bin/labelless retrain "$run/quantized.lless" --weights "$run/teacher.safetensors" \
      --unlabeled mnist --limit 2000 --eval fashion-mnist --epochs 2 --batch-size 128 \
      ${variant#*:} --seed "$seed" -o "/tmp/labelless-cutmix/$name.lless" -q
    cp "/tmp/labelless-cutmix/$name.lless.json" "$out/$name.json"
  done
done
.venv/bin/python - "$out" "${variants[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, variants = Path(sys.argv[1]), sys.argv[2:]
print("| CutMix | test accuracy % (seeds 0, 1, 2) | mean | held-out KL after (mean) | training images/s (mean) | best epochs |")
print("|---|---|---:|---:|---:|---|")
for variant in variants:
    name, flags = variant.split(":", 1)
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{name}-seed*.json"))]
    acc = [r["test_accuracy_after"] for r in runs]
    print(f"| `{flags}` | {', '.join(f'{a:.2f}' for a in acc)} | {statistics.fmean(acc):.2f} | "
          f"{statistics.fmean(r['after']['kl'] for r in runs):.4f} | "
          f"{statistics.fmean(r['images_per_second'] for r in runs):.0f} | {', '.join(str(r['best_epoch']) for r in runs)} |")
print(f"\nbefore retraining: {runs[0]['test_accuracy_before']:.2f}%")
EOF
