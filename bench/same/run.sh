#!/usr/bin/env bash
# Does a refactor change what `labelless run` gives? One fixed tiny config, run by REV and by the
# working tree; report.json compared field by field (timings aside) and the written files by sha256.
#   bash bench/same/run.sh a403f6f      # exit 0 when everything is identical
set -euo pipefail
rev=${1:?usage: bench/same/run.sh REV}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
git -C "$root" worktree add -q --detach "$work/rev" "$rev"
trap 'git -C "$root" worktree remove --force "$work/rev"; rm -rf "$work"' EXIT
cd "$work"
PYTHONPATH="$work/rev/src" "$root/.venv/bin/python" -m labelless -q run "$root/bench/same/tiny.yaml" --out before >/dev/null
PYTHONPATH="$root/src" "$root/.venv/bin/python" -m labelless -q run "$root/bench/same/tiny.yaml" --out after >/dev/null
out=$("$root/.venv/bin/python" "$root/bench/same/compare.py" before/report.json after/report.json)
echo "$out"
status=0
[ "$out" = "compared" ] || status=1
for f in model.lless quantized.lless baseline.lless plan.yaml; do
  if cmp -s "before/$f" "after/$f"; then echo "$f: identical"; else echo "$f: differs"; status=1; fi
done
exit $status
