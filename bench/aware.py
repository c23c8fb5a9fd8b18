"""Retraining-aware search against today's: does a plan's label-free drop predict its test drop,
and which file does each search pick for the same accuracy after retraining?

Reads a finished ``labelless run`` folder (its config, teacher and sweep), walks the search's
ladder of plans between two sizes, and for each sampled plan measures, as ``labelless run``
would make it (importance-weighted k-means, then compensation):

* ``drop_before``: agreement drop on the sweep's unlabelled images with nearest-centroid
  indices (what the search sees with ``search: {as_shipped: false}``);
* ``drop_shipped``: the same of the model as the run ships it, compensated (what the search
  sees by default, ``as_shipped: true``);
* ``drop_after``: the same after a short label-free retraining on images held apart from the
  sweep's (what the retraining-aware search sees: ``search: {after_retraining: n}``);
* ``balanced_*`` / ``kl_*``: the same three in class-balanced agreement drop and in KL;
* ``test_before`` / ``test_after``: accuracy on the test set as quantized, and after the run's
  full label-free retraining (what a user ships).

The report adds the Spearman rank correlation of each label-free measure with the test drop.

Every finished plan is written to the JSON at once; a rerun skips it. ``--report`` renders the
markdown tables (picks per budget, and every plan) and the scatter of label-free drop against
test drop. No label is read except the test set's, to score.

    .venv/bin/python bench/aware.py --run runs/default --out bench/results/aware-resnet18.json
    .venv/bin/python bench/aware.py --report bench/results/aware-resnet18.json --plot docs/aware-resnet18.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

import labelless
from labelless.calibrate import calibrated_model
from labelless.config import from_mapping
from labelless.data import Preprocess, open_images
from labelless.evaluate import accuracy, predict
from labelless.importance import fisher_importance
from labelless.io import atomic_write_json
from labelless.refine import refine_images
from labelless.retrain import RetrainConfig
from labelless.runconfig import RunConfig
from labelless.search import ladder, make_evaluator
from labelless.sensitivity import SweepResult, prepare_reference

log = logging.getLogger("bench.aware")
BUDGETS = (1.0, 2.0, 5.0, 10.0)  # points of label-free agreement drop a search may spend
SIZE_TARGETS = (0.93, 0.95)  # shares of the fp32 size saved


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.report:
        rows = json.loads(Path(args.report).read_text())
        print(render(rows, args.plot))
        return 0
    measure(Path(args.run), Path(args.out), args.rungs, (args.smallest, args.largest), args.test_limit)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished `labelless run` folder (config.yaml, teacher, sweep/)")
    parser.add_argument("--out", default="bench/results/aware.json")
    parser.add_argument("--rungs", type=int, default=10, help="plans sampled from the ladder")
    parser.add_argument("--smallest", type=float, default=0.975, help="most saved share of fp32 sampled")
    parser.add_argument("--largest", type=float, default=0.90, help="least saved share of fp32 sampled")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default all)")
    parser.add_argument("--report", help="render this JSON instead of measuring")
    parser.add_argument("--plot", help="with --report: write the scatter here")
    return parser


@dataclasses.dataclass
class Setup:
    config: RunConfig
    spec: labelless.ModelSpec
    teacher: torch.nn.Module
    preprocess: torch.nn.Module
    importance: dict
    reference: object
    sweep: SweepResult

    refined: dict = dataclasses.field(default_factory=dict)

    def images(self, spec: str, limit: int | None, after: int = 0, labeled: bool = False, split: str = "train"):
        return open_images(spec, split=split, labeled=labeled, size=self.spec.image_size, channels=self.spec.in_channels,
                           limit=limit, seed=self.config.seed, after=after)

    def retraining_images(self, limit: int | None, after: int = 0):
        """The unlabelled retraining images, refined toward the teacher once (as the run does)
        when its retraining refines them; retrain them with :meth:`retrain_config`."""
        if (limit, after) not in self.refined:
            images = self.images(self.config.data.unlabeled, limit, after=after).unlabeled()
            steps = self.config.retrain.refine_steps
            self.refined[limit, after] = refine_images(self.teacher, images, self.preprocess, steps) if steps else images
        return self.refined[limit, after]

    def retrain_config(self, **changes) -> RetrainConfig:
        return dataclasses.replace(self.config.retrain, refine_steps=0, **changes)


def setup(run: Path) -> Setup:
    config = from_mapping(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
    report = json.loads((run / "report.json").read_text())
    spec = labelless.ModelSpec.from_dict(report["model"])
    teacher = labelless.load_weights(labelless.build_model(spec), run / "teacher.safetensors").eval()
    preprocess = Preprocess.for_spec(spec)
    partial = Setup(config, spec, teacher, preprocess, {}, None, SweepResult.from_dir(run / "sweep"))
    data, cfg = config.data, config.sweep
    partial.importance = fisher_importance(teacher, partial.images(data.unlabeled, cfg.importance_images).unlabeled(),
                                           preprocess, n_images=cfg.importance_images, seed=config.seed)
    swept = partial.images(data.unlabeled, cfg.limit).unlabeled()
    partial.reference = prepare_reference(teacher, swept, preprocess, None, cfg.batch_size, torch.device("cpu"))
    partial.reference.importance = partial.importance
    return partial


def sample(rungs: list, fp32: int, n: int, span: tuple[float, float]) -> list:
    """About ``n`` rungs spread evenly in size between the two shares of fp32 saved."""
    low, high = (1 - span[0]) * fp32, (1 - span[1]) * fp32
    inside = [r for r in rungs if low <= r.predicted_bytes <= high]
    if len(inside) <= n:
        return inside
    step = (len(inside) - 1) / (n - 1)
    return [inside[round(i * step)] for i in range(n)]


def measure(run: Path, out: Path, n: int, span: tuple[float, float], test_limit: int | None) -> None:
    s = setup(run)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {json.dumps(r["plan"], sort_keys=True) for r in rows}
    evaluate = make_evaluator(s.reference)
    test = s.images(s.config.data.test, test_limit, labeled=True, split="test")
    teacher_accuracy = _accuracy(s.teacher, test, s.preprocess)
    for rung in sample(ladder(s.sweep), s.sweep.reference["fp32_bytes"], n, span):
        plan = rung.plan().to_data()
        if json.dumps(plan, sort_keys=True) in done:
            continue
        row = _measure_plan(s, rung, evaluate, test)
        rows.append(dict(row, plan=plan, teacher_accuracy=teacher_accuracy, model=s.spec.name,
                         fp32_bytes=s.sweep.reference["fp32_bytes"], test_images=len(test), machine=_machine(),
                         date=datetime.date.today().isoformat()))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, rows)
        log.info("%s: %d bytes, drop %.2f -> %.2f (label-free), test %.2f -> %.2f", s.spec.name, row["bytes"],
                 row["drop_before"], row["drop_after"], row["test_before"], row["test_after"])


def _measure_plan(s: Setup, rung, evaluate, test) -> dict:
    start = time.perf_counter()
    _, drop_before, before = evaluate(rung.choice)
    config, data = s.config, s.config.data
    model = calibrated_model(s.teacher, rung.plan(), s.images(data.unlabeled, config.quantize.images).unlabeled(),
                             s.preprocess, importance=s.importance, compensate=config.quantize.compensate,
                             correct_bn=config.quantize.correct_bn, n_images=config.quantize.images, seed=config.seed)
    short = labelless.retrain(copy.deepcopy(model), s.teacher,
                              s.retraining_images(config.search.retrain_images, after=config.sweep.limit), s.preprocess,
                              config=s.retrain_config(epochs=config.search.retrain_epochs))
    full = labelless.retrain(copy.deepcopy(model), s.teacher, s.retraining_images(data.unlabeled_limit), s.preprocess,
                             config=s.retrain_config())
    path = Path("/tmp") / f"aware-{s.spec.name}.lless"
    size = labelless.save(full.model, path)["total_bytes"]
    after, shipped = s.reference.figures_of(short.model), s.reference.figures_of(model)
    return {"bytes": size, "drop_before": drop_before, "drop_shipped": 100.0 - shipped["agreement"],
            "drop_after": 100.0 - after["agreement"],
            "balanced_before": 100.0 - before["balanced"], "balanced_shipped": 100.0 - shipped["balanced"],
            "balanced_after": 100.0 - after["balanced"],
            "kl_before": before["kl"], "kl_shipped": shipped["kl"], "kl_after": after["kl"],
            "test_before": _accuracy(model, test, s.preprocess), "test_after": _accuracy(full.model, test, s.preprocess),
            "seconds": round(time.perf_counter() - start, 1)}


def _accuracy(model, test, preprocess) -> float:
    logits, labels = predict(model, test, preprocess)
    return accuracy(logits, labels)


def _machine() -> str:
    from machine import describe  # bench/machine.py

    return f"{describe()}, torch {torch.__version__}"


# -- report --------------------------------------------------------------------------------


def render(rows: list[dict], plot: str | None = None) -> str:
    rows = sorted(rows, key=lambda r: r["bytes"])
    if plot:
        _scatter(rows, plot)
    first = rows[0]
    have = [field for field in SEARCHES if all(field in r for r in rows)]  # older rows lack drop_shipped
    lines = [f"{first['model']}: teacher {first['teacher_accuracy']:.2f}% on {first['test_images']:,} test images; "
             f"{len(rows)} plans of the ladder; {first['machine']}, {first['date']}.", "",
             "| budget | " + " | ".join(f"{SEARCHES[f]} picks | its test % after retraining" for f in have) + " |",
             "|---|" + "---:|---:|" * len(have)]
    for budget in BUDGETS:
        lines.append(_budget_row(f"drop <= {budget:g} points", [_smallest(rows, f, budget) for f in have]))
    for target in SIZE_TARGETS:
        fits = [r for r in rows if r["bytes"] <= (1 - target) * first["fp32_bytes"]]
        lines.append(_budget_row(f">= {100 * target:g}% smaller", [_least(fits, f) for f in have]))
    lines += ["", "| bytes | smaller | label-free drop, plain indices | as shipped | after short retraining "
                  "| test % as shipped | test % retrained |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['bytes']:,} | {100 * (1 - r['bytes'] / r['fp32_bytes']):.2f}% | {r['drop_before']:.2f} | "
              f"{_cell(r.get('drop_shipped'))} | {r['drop_after']:.2f} | {r['test_before']:.2f} | "
              f"{r['test_after']:.2f} |" for r in rows]
    return "\n".join(lines + ["", *_rank_table(rows)])


MEASURES = {"drop": "top-1 agreement drop", "balanced": "class-balanced agreement drop", "kl": "KL"}
# the label-free drop each search judges plans by: the row field it reads, and its name
SEARCHES = {"drop_before": "plain-index search", "drop_shipped": "as-shipped search",
            "drop_after": "retraining-aware search"}
MOMENTS = {"before": "plain indices", "shipped": "as shipped", "after": "after retraining"}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rank_table(rows: list[dict]) -> list[str]:
    """Spearman rank correlation of each label-free measure with the test drop, over the plans
    that have it (rows measured before the balanced and KL figures lack them)."""
    lines = ["| label-free measure | " + " | ".join(f"Spearman with the test drop, {m}" for m in MOMENTS.values())
             + " | plans |", "|---|" + "---:|" * (len(MOMENTS) + 1)]
    teacher, body = rows[0]["teacher_accuracy"], []
    for key, name in MEASURES.items():
        have = [r for r in rows if f"{key}_before" in r]
        if len(have) < 3:
            continue
        cells = [_spearman([r[f"{key}_{when}"] for r in have], [teacher - r[f"test_{_test(when)}"] for r in have])
                 if all(f"{key}_{when}" in r for r in have) else None for when in MOMENTS]
        body.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + f" | {len(have)} |")
    return lines + body if body else []


def _test(moment: str) -> str:
    """The test accuracy a label-free moment predicts: the model as quantized (plain indices are
    never shipped: the test figure is of the compensated model), or after retraining."""
    return "after" if moment == "after" else "before"


def _spearman(x: list[float], y: list[float]) -> float:
    import numpy as np

    def ranks(values):
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values))
        for v in set(values):  # ties share their mean rank
            same = np.asarray(values) == v
            out[same] = out[same].mean()
        return out

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")  # a constant column ranks nothing
    return float(np.corrcoef(rx, ry)[0, 1])


def _smallest(rows: list[dict], field: str, budget: float) -> dict | None:
    fits = [r for r in rows if r[field] <= budget]
    return min(fits, key=lambda r: r["bytes"]) if fits else None


def _least(rows: list[dict], field: str) -> dict | None:
    """The search's pick under a size budget: least drop, then least KL (as search._most_faithful)."""
    kl = field.replace("drop", "kl")
    return min(rows, key=lambda r: (r[field], r[kl], r["bytes"])) if rows else None


def _budget_row(name: str, picks: list[dict | None]) -> str:
    def cells(row):
        return "none fits | -" if row is None else f"{row['bytes']:,} | {row['test_after']:.2f}"

    return f"| {name} | " + " | ".join(cells(row) for row in picks) + " |"


def _scatter(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = rows[0]["teacher_accuracy"]
    figure, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([r["drop_before"] for r in rows], [teacher - r["test_before"] for r in rows], marker="x",
               label="plain indices")
    if all("drop_shipped" in r for r in rows):
        ax.scatter([r["drop_shipped"] for r in rows], [teacher - r["test_before"] for r in rows], label="as shipped")
    ax.scatter([r["drop_after"] for r in rows], [teacher - r["test_after"] for r in rows], marker="^",
               label="after label-free retraining")
    ax.set_xlabel("label-free drop: agreement with the teacher on unlabelled images (points)")
    ax.set_ylabel("test accuracy drop (points)")
    ax.set_title(f"{rows[0]['model']}: does the label-free drop predict the test drop?", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
