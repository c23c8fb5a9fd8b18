"""``labelless run``: the whole pipeline from one config, or the built-in default demo."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import load_yaml
from ..data import check_spec
from ..errors import LabellessError
from ..io import check_input_file, is_writable_folder
from ..layers import list_layers
from ..models import ModelSpec, build_model, check_input_size
from ..pipeline import RunConfig, run_pipeline
from ..plan import load_plan
from ..report import summary_table
from ..sensitivity import SweepConfig
from .common import check_device


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="train or load a teacher, sweep, search, quantize, retrain label-free, report",
        description="With no CONFIG: the built-in demo (a compact model on Fashion-MNIST, retrained "
        "label-free on MNIST digits).")
    parser.add_argument("config", nargs="?", help="a YAML config (sections as in RunConfig; see README)")
    parser.add_argument("--out", default=None, help="output folder (overrides the config's out)")
    parser.add_argument("--device", default=None, help="overrides the config's device")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = RunConfig.from_data(load_yaml(args.config)) if args.config else RunConfig()
    overrides = {k: v for k, v in (("out", args.out), ("device", args.device)) if v}
    config = dataclasses.replace(config, **overrides)
    check_run_config(config)
    report = run_pipeline(config)
    print(summary_table(report))
    print(f"size reduction {100 * report['size_reduction']:.2f}% (real file); report: {config.out}/report.md")
    return 0


def check_run_config(config: RunConfig) -> None:
    """Every check that needs no training, before any: a typo fails in a second, not an hour in.

    Raises :class:`LabellessError` naming the config field and what to write instead.
    """
    spec = _check_model(config)
    _check_data(config)
    _check_choices(config)
    if config.search.plan:
        plan = load_plan(config.search.plan)
        plan.resolve(list_layers(build_model(spec, device="meta")))  # selectors out of range fail here
    check_device(config.device)
    _check_out(Path(config.out))


def _check_model(config: RunConfig) -> ModelSpec:
    section = config.model
    spec = ModelSpec(section.name, num_classes=section.num_classes, in_channels=section.in_channels,
                     small_input=section.small_input, image_size=section.image_size, mean=section.mean,
                     std=section.std)
    check_input_size(spec)
    if section.weights:
        check_input_file(section.weights, "model.weights file")
    return spec


def _check_data(config: RunConfig) -> None:
    data = config.data
    specs = {"data.unlabeled": data.unlabeled, "data.test": data.test}
    if config.baseline:
        specs["data.baseline"] = data.baseline
    if not config.model.weights:
        specs["teacher.data"] = config.teacher.data
    for field, spec in specs.items():
        try:
            check_spec(spec)
        except LabellessError as exc:
            raise LabellessError(f"run config {field}: {exc}") from None
    limits = {"teacher.limit": config.teacher.limit, "data.unlabeled_limit": data.unlabeled_limit,
              "data.test_limit": data.test_limit, "data.baseline_limit": data.baseline_limit,
              "sweep.limit": config.sweep.limit}
    for field, limit in limits.items():
        if limit is not None and limit < 1:
            raise LabellessError(f"run config {field} must be a whole number >= 1 (or null for all images), "
                                 f"got {limit}")


def _check_choices(config: RunConfig) -> None:
    search, storage, sweep = config.search, config.storage, config.sweep
    if search.metric != "agreement":
        raise LabellessError(f"run config search.metric must be 'agreement' (labelless run sweeps without labels), "
                             f"got {search.metric!r}")
    if search.max_drop < 0:
        raise LabellessError(f"run config search.max_drop must be >= 0 points, got {search.max_drop}")
    if storage.entropy not in ("none", "ans"):
        raise LabellessError(f"run config storage.entropy must be 'none' or 'ans', got {storage.entropy!r}")
    try:
        SweepConfig(clusters=sweep.clusters, include_bias=sweep.include_bias, batch_size=sweep.batch_size,
                    granularities=sweep.granularities)
        if sweep.importance_images < 1:
            raise LabellessError(f"importance_images must be >= 1, got {sweep.importance_images}")
    except LabellessError as exc:
        raise LabellessError(f"run config sweep: {exc}") from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LabellessError(f"run config out {str(out)!r} is a file: give a folder (it is created if missing)")
    existing = next(p for p in [out, *out.resolve().parents] if p.exists())
    if not existing.is_dir() or not is_writable_folder(existing):
        raise LabellessError(f"cannot create or write the output folder {str(out)!r} ({existing} is not writable): "
                             f"choose another out")
