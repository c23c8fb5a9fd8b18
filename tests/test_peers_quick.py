"""The peer benchmark runs end to end on a CPU with --quick and writes every expected row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    """bench/peers.py itself, for the rows it promises (so this test follows its method list)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "bench/peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BENCH = _bench_module()
METHODS = list(BENCH.PEERS + BENCH.LABELLESS)
RETRAININGS = list(BENCH.RETRAIN_KINDS)


MODEL = "mobilenet_v2"  # what --quick runs


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs the Fashion-MNIST package")
def test_peers_quick_writes_every_row_with_a_valid_accuracy_and_size(tmp_path):
    pytest.importorskip("coremltools")
    pytest.importorskip("torchao")
    env = dict(os.environ, OMP_NUM_THREADS="2", LABELLESS_PROGRESS="0")
    run = subprocess.run([sys.executable, "bench/peers.py", "--quick", "--out", str(tmp_path), "--cache",
                          str(tmp_path / "cache")], cwd=ROOT, env=env, timeout=900, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    written = json.loads((tmp_path / "peers.json").read_text())
    rows = {(r["model"], r["method"], r["bits"], r["seed"]): r for r in written}
    methods = METHODS + RETRAININGS + list(BENCH.EXTRA_KINDS) + list(BENCH.BN_KINDS) + list(BENCH.REFINE_KINDS)
    expected = [(MODEL, "teacher", 32, 0)] + [(MODEL, m, 2, 0) for m in methods]
    assert sorted(rows) == sorted(expected)
    for key in expected:
        row = rows[key]
        if "error" in row:  # only a labelless variant whose API is not in this checkout may be missing
            assert key[1].startswith("labelless+") and row["allowed"] == "labelless API not there yet", row
            continue
        assert 0 <= row["accuracy"] <= 100 and row["bytes"] > 0, row
        assert row.get("unquantized", []) == [], row
    plain, palettized = rows[(MODEL, "labelless", 2, 0)], rows[(MODEL, "coremltools-ptp", 2, 0)]
    assert plain["payload_bytes"] == palettized["payload_bytes"]  # same levels per tensor, fp32 codebooks
    assert plain["payload_bytes"] < plain["bytes"] < rows[(MODEL, "teacher", 32, 0)]["bytes"]


def test_peers_report_has_one_line_per_method(tmp_path):
    rows = [{"model": MODEL, "method": "teacher", "bits": 32, "seed": 0, "accuracy": 90.0, "bytes": 100,
             "epochs": 2, "train_images": 60000, "date": "2026-01-01", "machine": "CPU, 2 cores", "mode": "full",
             "test_images": 10000, "versions": {"torch": "2.14.1"}}]
    rows += [{"model": MODEL, "method": m, "bits": b, "seed": 0, "accuracy": 50.0, "bytes": 10, "payload_bytes": 9,
              "seconds": 1.0} for m in METHODS for b in (2, 3)]
    rows += [{"model": MODEL, "method": k, "bits": 2, "seed": s, "accuracy": 60.0 + s, "bytes": 10, "seconds": 1.0,
              "source": "labelless", "train_images": 2000, "epochs": 5} for k in RETRAININGS for s in range(3)]
    rows.append({"model": MODEL, "method": "torchao-intx", "bits": 4, "seed": 0, "error": "ImportError: x"})
    (tmp_path / "peers.json").write_text(json.dumps(rows))
    subprocess.run([sys.executable, "bench/peers.py", "--report", str(tmp_path / "peers.json"), "-o",
                    str(tmp_path / "PEERS.md")], cwd=ROOT, check=True, timeout=120, capture_output=True)
    text = (tmp_path / "PEERS.md").read_text()
    lines = text.splitlines()
    assert all(sum(line.startswith(f"| {m} |") for line in lines) == 2 for m in METHODS)  # accuracy and time
    assert "61.00 ± 0.82" in text and "`ImportError: x`" in text
