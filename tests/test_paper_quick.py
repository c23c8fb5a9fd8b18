"""The paper-scale script runs end to end on a CPU with --quick (tiny subsets, one epoch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"model", "plan", "bytes", "fp32_bytes", "size_reduction", "accuracy_original", "accuracy_quantized",
          "accuracy_labelfree_same", "accuracy_labelfree_other", "accuracy_labeled", "seeds", "retrain_seconds",
          "device", "date"}


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs the Fashion-MNIST package")
def test_paper_script_quick_writes_complete_rows_and_a_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", LABELLESS_PROGRESS="0")
    subprocess.run([sys.executable, "bench/paper.py", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, timeout=1200, capture_output=True)
    rows = json.loads((tmp_path / "paper.json").read_text())
    assert {r["model"] for r in rows} == {"vgg16_bn", "resnet50"}
    assert {(r["model"], r["plan"]["name"], r["tune_centroids"]) for r in rows} == {
        (m, p, t) for m in ("vgg16_bn", "resnet50") for p in ("searched", "paper") for t in (False, True)}
    for row in rows:
        assert FIELDS <= set(row)
        assert 0 < row["bytes"] < row["fp32_bytes"] and row["seeds"] == 1
        assert row["size_reduction"] == pytest.approx(100 * (1 - row["bytes"] / row["fp32_bytes"]))
    assert {r["scale"] for r in rows} == {"quick"} and (tmp_path / "cache").is_dir()
    subprocess.run([sys.executable, "bench/paper.py", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, timeout=300, capture_output=True)
    assert json.loads((tmp_path / "paper.json").read_text()) == rows  # a rerun skips every finished row
    paper_vgg = next(r for r in rows if r["model"] == "vgg16_bn" and r["plan"]["name"] == "paper")
    assert paper_vgg["plan"]["rules"] == [{"layers": "*", "bias": 1}, {"layers": "14-15", "weights": 32}]
    report = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, "bench/paper.py", "--report", str(tmp_path / "paper.json"), "-o", str(report)],
                   cwd=ROOT, env=env, check=True, timeout=300)
    rows_section = report.read_text().split("## Rows")[1].split("## Targets")[0]
    assert rows_section.count("| vgg16_bn |") == 4 and "## Retraining speed" in report.read_text()
