#!/usr/bin/env bash
# Does matching CutMix-ed images to cached teacher outputs (mixed by area) cost accuracy against
# running the teacher on them? Label-free retraining of the demo's quantized model on 2,000 MNIST
# digits (as `labelless run` does), both ways, 3 seeds, scored on all 10,000 Fashion-MNIST test
# images. Needs a finished demo run (bash scripts/demo.sh) in RUN. One JSON per run in OUT; a
# rerun skips those there.
#   bash bench/cutmix_targets.sh [RUN=runs/default] [OUT=docs/results/cutmix_targets]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/default}
out=${2:-docs/results/cutmix_targets}
mkdir -p "$out" /tmp/cutmix_targets
for seed in 0 1 2; do
  for targets in teacher cached; do
    name="$targets-seed$seed"
    [[ -f "$out/$name.json" ]] && continue
    .venv/bin/labelless retrain "$run/quantized.lless" --weights "$run/teacher.safetensors" \
      --unlabeled mnist --limit 2000 --eval fashion-mnist --epochs 2 --batch-size 128 \
      --cutmix-targets "$targets" --seed "$seed" -o "/tmp/cutmix_targets/$name.lless"
    cp "/tmp/cutmix_targets/$name.lless.json" "$out/$name.json"
  done
done
.venv/bin/python - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
rows = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
print("| cutmix targets | test accuracy % (seeds 0, 1, 2) | mean | training images/s (mean) | best epochs |")
print("|---|---|---:|---:|---|")
for targets in ("teacher", "cached"):
    runs = [rows[k] for k in sorted(rows) if k.startswith(targets + "-")]
    acc = [r["test_accuracy_after"] for r in runs]
    print(f"| {targets} | {', '.join(f'{a:.2f}' for a in acc)} | {statistics.fmean(acc):.2f} | "
          f"{statistics.fmean(r['images_per_second'] for r in runs):.1f} | {', '.join(str(r['best_epoch']) for r in runs)} |")
print(f"\nbefore retraining: {runs[0]['test_accuracy_before']:.2f}%")
EOF
