"""Every torchvision classifier through the whole chain: quantize, save, load, decompress, export.

Random-weight instances with 10 classes at the smallest input size each network accepts
(labelless.roundtrip.smallest_input); every weight and bias at 16 and 1 centroid. A model
passes when the loaded and the decompressed model give exactly the saved model's outputs and
ONNX Runtime's outputs of the compressed graph lie within 1e-3 (relative) of them. Each
model's row is written as soon as it exists; a rerun skips the rows already there.

    python bench/zoo.py                         # all 80, JSON in bench/results/zoo.json
    python bench/zoo.py --models resnet18,vit_b_32 --time-limit 1200
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import describe  # noqa: E402  (bench/machine.py)

from labelless.io import atomic_write_json  # noqa: E402
from labelless.models import available_models  # noqa: E402
from labelless.roundtrip import round_trip, smallest_input  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "zoo.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated names (default: every classifier)")
    parser.add_argument("--out", default=str(OUT), help=f"the JSON rows (default {OUT})")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds after which no new model starts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"machine": _machine(), "rows": {}}
    deadline = time.monotonic() + (args.time_limit or float("inf"))
    for name in (args.models.split(",") if args.models else available_models()):
        if name in data["rows"] or time.monotonic() > deadline:
            continue
        data["rows"][name] = _row(name)
        atomic_write_json(out, data)
        print(f"{name}: {data['rows'][name]['result']}", flush=True)
    passed = sum(r["result"] == "passed" for r in data["rows"].values())
    print(f"{passed} of {len(data['rows'])} passed")
    return 0


def _row(name: str) -> dict:
    start = time.perf_counter()
    try:
        row = dict(round_trip(smallest_input(name)), result="passed")
    except AssertionError as exc:
        row = {"model": name, "result": f"failed: {exc}"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["machine"] = f"{describe()}, {datetime.date.today().isoformat()}"  # rows of several sessions share the file
    return row


def _machine() -> dict:
    return {"cpu": describe(), "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


if __name__ == "__main__":
    raise SystemExit(main())
