"""Benchmark ONNX export: file sizes and ONNX Runtime CPU latency, dense vs compressed graph.

For each plan, a random-init model is quantized and saved as .lless, then exported twice
(compressed and --dense). Sizes are exact; latencies are medians over ``--repeats`` runs
after two warm-up runs, for batch 1 and batch 64; "load" is the session creation time (the
compressed graph is folded into plain weights then). Random weights are fine: neither size
nor latency depends on the values.

    python bench/export.py                 # table on stdout, JSON in bench/results/export.json
    python bench/export.py --repeats 5     # quicker
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import labelless
from labelless.export import export_onnx
from labelless.io import atomic_write_json

MODELS = {"resnet18 (32 px, 1 ch, 10 classes)": labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True)}
PLANS = {
    "weights 16, biases 1": [{"layers": "*", "weights": 16, "bias": 1}],
    "weights 4, biases 1": [{"layers": "*", "weights": 4, "bias": 1}],
}
BATCHES = (1, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = [measure(name, spec, plan_name, plan, args) for name, spec in MODELS.items() for plan_name, plan in PLANS.items()]
    result = {"machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
              "threads": args.threads, "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(markdown(result))
    return 0


def measure(model_name: str, spec: labelless.ModelSpec, plan_name: str, plan: list, args) -> dict:
    """Sizes and latencies of one model under one plan."""
    quantized = labelless.quantize(labelless.build_model(spec).eval(), plan)
    with tempfile.TemporaryDirectory() as folder:
        lless = Path(folder) / "model.lless"
        labelless.save(quantized, lless)
        row = {"model": model_name, "plan": plan_name, "lless_bytes": lless.stat().st_size}
        outputs = {}
        for kind in ("dense", "compressed"):
            path = Path(folder) / f"{kind}.onnx"
            row[f"{kind}_onnx_bytes"] = export_onnx(lless, path, dense=kind == "dense")["onnx_bytes"]
            outputs[kind] = time_graph(path, spec, args, row, kind)
    row["ratio"] = row["compressed_onnx_bytes"] / row["lless_bytes"]
    row["max_rel_diff"] = float(np.abs(outputs["dense"] - outputs["compressed"]).max() / np.abs(outputs["dense"]).max())
    return row


def time_graph(path: Path, spec: labelless.ModelSpec, args, row: dict, kind: str) -> np.ndarray:
    """Fill ``row`` with load and per-batch median latencies (ms); return the batch-64 output."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    row[f"{kind}_load_ms"] = 1000 * (time.perf_counter() - start)
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        x = rng.standard_normal((batch, spec.in_channels, spec.image_size, spec.image_size)).astype(np.float32)
        for _ in range(2):
            output = session.run(None, {"input": x})[0]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            session.run(None, {"input": x})
            times.append(1000 * (time.perf_counter() - start))
        row[f"{kind}_batch{batch}_ms"] = statistics.median(times)
    return output


def machine() -> dict:
    from machine import cpu_name  # bench/machine.py

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "labelless": labelless.__version__}


def markdown(result: dict) -> str:
    headers = ["model", "plan", ".lless", "compressed onnx", "ratio", "dense onnx",
               "load ms (dense / compr.)", "batch 1 ms (dense / compr.)", "batch 64 ms (dense / compr.)", "max rel diff"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in result["rows"]:
        cells = [r["model"], r["plan"], f"{r['lless_bytes']:,}", f"{r['compressed_onnx_bytes']:,}",
                 f"{r['ratio']:.3f}", f"{r['dense_onnx_bytes']:,}", *(pair(r, key) for key in ("load_ms", "batch1_ms", "batch64_ms")),
                 f"{r['max_rel_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    lines.append(f"\n{m['cpu']}, {m['cores']} cores, {result['threads']} ORT threads, median of {result['repeats']}; "
                 f"load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after; {m['date']}; "
                 f"torch {m['torch']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}")
    return "\n".join(lines)


def pair(row: dict, key: str) -> str:
    return f"{row[f'dense_{key}']:.1f} / {row[f'compressed_{key}']:.1f}"


if __name__ == "__main__":
    sys.exit(main())
