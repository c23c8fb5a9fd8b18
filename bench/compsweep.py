"""Does a compensated sweep give the search a better ladder? Plain against compensated sweep rows.

Reads a finished ``labelless run`` folder (its config, teacher and plain sweep), sweeps the same
tensors again with ``SweepConfig(compensate=True)`` (each weight's indices GPTQ-compensated on
the sweep's images, as the run ships it), and for each size target lets the as-shipped search
(``labelless run``'s default) pick a plan from each ladder. Each pick is quantized and
compensated as the run does it and scored on the test set, without retraining. Rows are
written to the JSON as each target finishes; ``--report`` renders the table.

    .venv/bin/python bench/compsweep.py --run runs/default --out bench/results/compsweep-resnet18.json
    .venv/bin/python bench/compsweep.py --report bench/results/compsweep-resnet18.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path

from aware import _accuracy, _machine, setup  # bench/aware.py: the run folder's teacher, data and reference

import labelless
from labelless.calibrate import calibrated_model
from labelless.io import atomic_write_json
from labelless.search import make_evaluator, search
from labelless.sensitivity import sweep

log = logging.getLogger("bench.compsweep")
TARGETS = (0.95, 0.96, 0.97, 0.975)  # shares of the fp32 size saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished `labelless run` folder")
    parser.add_argument("--out", default="bench/results/compsweep.json")
    parser.add_argument("--report", help="render this JSON instead of measuring")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    measure(Path(args.run), Path(args.out))
    return 0


def measure(run: Path, out: Path) -> None:
    s = setup(run)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["sweep"], r["target"]) for r in rows}
    data = s.config.data
    swept = s.images(data.unlabeled, s.config.sweep.limit).unlabeled()
    start = time.perf_counter()
    compensated = sweep(s.teacher, swept, s.preprocess, config=dataclasses.replace(s.config.sweep.config(),
                        compensate=True), out_dir=run / "sweep-compensated", importance=s.importance)
    sweep_seconds = round(time.perf_counter() - start, 1)
    calibration = s.images(data.unlabeled, s.config.quantize.images).unlabeled()
    test = s.images(data.test, None, labeled=True, split="test")
    teacher_accuracy = _accuracy(s.teacher, test, s.preprocess)
    shipped: dict[str, object] = {}

    def build(choice):
        key = json.dumps(labelless.Plan.from_choice(choice).to_data(), sort_keys=True)
        if key not in shipped:
            shipped[key] = calibrated_model(s.teacher, labelless.Plan.from_choice(choice), calibration, s.preprocess,
                                            importance=s.importance, compensate=True,
                                            n_images=s.config.quantize.images, seed=s.config.seed)
        return shipped[key]

    evaluate = make_evaluator(s.reference, "agreement", build)
    for name, result in (("plain", s.sweep), ("compensated", compensated)):
        for target in TARGETS:
            if (name, target) in done:
                continue
            found = search(result, evaluate, smaller_by=target)
            model = build(found.best.choice)
            rows.append({"sweep": name, "target": target, "bytes": found.best.bytes,
                         "drop": found.best.measured_drop, "kl": found.best.measured["kl"],
                         "test": _accuracy(model, test, s.preprocess), "teacher_accuracy": teacher_accuracy,
                         "fp32_bytes": result.reference["fp32_bytes"], "test_images": len(test),
                         "compensated_sweep_seconds": sweep_seconds, "machine": _machine(),
                         "date": datetime.date.today().isoformat()})
            atomic_write_json(out, rows)
            log.info("%s sweep, >= %.1f%% smaller: %d bytes, drop %.2f, test %.2f", name, 100 * target,
                     rows[-1]["bytes"], rows[-1]["drop"], rows[-1]["test"])


def render(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"Teacher {first['teacher_accuracy']:.2f}% on {first['test_images']:,} test images; {first['machine']}, "
             f"{first['date']}; the compensated sweep took {first['compensated_sweep_seconds']:.0f} s.", "",
             "| size target | plain sweep: bytes | drop (as shipped) | test % "
             "| compensated sweep: bytes | drop | test % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    by = {(r["sweep"], r["target"]): r for r in rows}
    for target in sorted({r["target"] for r in rows}):
        cells = []
        for name in ("plain", "compensated"):
            r = by.get((name, target))
            cells += ["-"] * 3 if r is None else [f"{r['bytes']:,}", f"{r['drop']:.2f}", f"{r['test']:.2f}"]
        lines.append(f"| >= {100 * target:g}% smaller | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
