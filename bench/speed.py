"""Retraining throughput: label-free (the default, and with CutMix on half the batches, where
the teacher runs on every mixed batch) against labelled retraining, on the paper's two
networks (issue 14's 0.9x target).

The networks, input and plans are those of bench/paper.py's CPU scale (32x32 one-channel
Fashion-MNIST, batch 64, VGG-16-bn with the small-input stem, ResNet-50 with torchvision's
stem; the searched plans read from ``paper.json``, the paper's own plans as they are).
Throughput does not depend on the weights' values, so the teachers are seeded random
initialisations and the plans are applied by plain k-means: the frozen tensors, the trained
parameters and every pass are those of the real rows, in minutes instead of hours.

Every measurement is appended to ``OUT/speed.json`` as soon as it exists; a rerun skips what
is there. Kinds run round-robin within each repeat, so that a slow spell of the machine
falls on all of them alike.

    nohup python bench/speed.py --out docs/results &
    python bench/speed.py --report docs/results/speed.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import describe  # noqa: E402  (bench/machine.py)
from paper import CPU, FASHION_MEAN, FASHION_STD, PAPER_PLANS  # noqa: E402  (bench/paper.py)

import labelless  # noqa: E402
from labelless.data import Preprocess, open_images  # noqa: E402
from labelless.io import atomic_write_json  # noqa: E402
from labelless.retrain import CrossEntropy, RetrainConfig, retrain  # noqa: E402

log = logging.getLogger("speed")

KINDS = {  # what each measurement runs: (label-free?, RetrainConfig changes)
    "labelfree": (True, {"cutmix": 0.0}),  # the default
    "labelfree_cutmix": (True, {"cutmix": 0.5}),  # the teacher runs on every mixed batch
    "labeled": (False, {}),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report:
        text = render(json.loads(Path(args.report).read_text()))
        Path(args.output).write_text(text) if args.output else print(text)
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    searched = _searched_plans(out / "paper.json")
    images = open_images("fashion-mnist", split="train", labeled=True, size=32, channels=1, limit=args.images)
    for name in args.models.split(","):
        plans = {"searched": searched.get(name), "paper": PAPER_PLANS[name]}
        for plan_name, rules in plans.items():
            if rules is not None:
                _measure(out / "speed.json", name, plan_name, rules, images, args)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results", help="folder of speed.json (and of paper.json's plans)")
    parser.add_argument("--models", default="vgg16_bn,resnet50")
    parser.add_argument("--images", type=int, default=2000, help="retraining images (10%% held out)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--report", default=None, help="render this speed.json as markdown")
    parser.add_argument("-o", "--output", default=None)
    return parser


def _searched_plans(path: Path) -> dict:
    rows = json.loads(path.read_text()) if path.is_file() else []
    return {r["model"]: r["plan"]["rules"] for r in rows if r["plan"]["name"] == "searched"}


def _measure(path: Path, name: str, plan_name: str, rules: list, images, args) -> None:
    done = {(r["model"], r["plan"], r["kind"], r["repeat"]) for r in _rows(path)}
    todo = [(k, i) for i in range(args.repeats) for k in KINDS if (name, plan_name, k, i) not in done]
    if not todo:
        return
    spec = labelless.ModelSpec(name, num_classes=10, in_channels=1, small_input=CPU.small_input[name],
                               image_size=32, mean=FASHION_MEAN, std=FASHION_STD)
    torch.manual_seed(0)
    teacher = labelless.build_model(spec).eval()
    student = labelless.quantize(teacher, rules)
    preprocess = Preprocess.for_spec(spec)
    for kind, repeat in todo:
        label_free, changes = KINDS[kind]
        config = RetrainConfig(epochs=args.epochs, batch_size=64, seed=repeat, min_holdout=1, **changes)  # speed only
        data = images.unlabeled() if label_free else images
        start = time.perf_counter()
        result = retrain(copy.deepcopy(student), teacher if label_free else CrossEntropy(), data, preprocess,
                         config=config)
        if result.skipped:
            raise SystemExit(f"{name} {plan_name} {kind}: nothing was trained ({result.skipped})")
        row = {"model": name, "plan": plan_name, "kind": kind, "repeat": repeat, "images": len(images),
               "epochs": args.epochs, "train_seconds": result.seconds, "images_per_second": result.images_per_second,
               "wall_seconds": time.perf_counter() - start, "machine": describe(),
               "date": datetime.date.today().isoformat(), "torch": torch.__version__}
        _append(path, row)
        log.info("%s %s %s #%d: %.1f images/s", name, plan_name, kind, repeat, result.images_per_second)


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def _append(path: Path, row: dict) -> None:
    atomic_write_json(path, _rows(path) + [row])


def render(rows: list[dict]) -> str:
    """Markdown: training images/s per network, plan and kind, each label-free kind against
    labelled, and the wall seconds of the whole call."""
    free = [k for k in KINDS if k != "labeled"]
    lines = ["| model | plan | " + " | ".join(f"{k} images/s" for k in KINDS) + " | "
             + " | ".join(f"{k} / labeled" for k in free) + " | wall s, labelfree | wall s, labeled |",
             "|---|---|" + "---:|" * (2 * len(KINDS) + 1)]
    for model, plan in dict.fromkeys((r["model"], r["plan"]) for r in rows):
        speed, wall = (means(rows, model, plan, field) for field in ("images_per_second", "wall_seconds"))
        ratios = [f"{speed[k] / speed['labeled']:.2f}x" if k in speed and "labeled" in speed else "-" for k in free]
        lines.append(f"| {model} | {plan} | " + " | ".join(_num(speed.get(k)) for k in KINDS) + " | "
                     + " | ".join(ratios) + f" | {_num(wall.get('labelfree'))} | {_num(wall.get('labeled'))} |")
    return "\n".join(lines) + "\n"


def means(rows: list[dict], model: str, plan: str, field: str) -> dict:
    """kind -> the mean of ``field`` over the repeats of one network and plan."""
    values = {}
    for r in rows:
        if (r["model"], r["plan"]) == (model, plan):
            values.setdefault(r["kind"], []).append(r[field])
    return {k: statistics.fmean(v) for k, v in values.items()}


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
