"""``labelless run``: the whole pipeline from one config, or the built-in default demo."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import commented_yaml, load_yaml
from ..pipeline import RunConfig, run_pipeline
from ..report import labeled_run, no_accuracy_line, recovery_line, summary_table


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="train or load a teacher, sweep, search, quantize, retrain label-free, report",
        description="With no CONFIG: the built-in demo (a compact model on Fashion-MNIST, retrained "
        "label-free on MNIST digits).")
    parser.add_argument("config", nargs="?", help="a YAML config (sections as in RunConfig; see README)")
    parser.add_argument("-o", "--out", default=None, help="output folder (overrides the config's out)")
    parser.add_argument("--device", default=None, help="overrides the config's device")
    parser.add_argument("--print-config", action="store_true",
                        help="print the full configuration (the defaults, or CONFIG resolved) as YAML with a comment "
                             "per field, and stop: a starting point for a config of your own")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = RunConfig.from_data(load_yaml(args.config)) if args.config else RunConfig()
    overrides = {k: v for k, v in (("out", args.out), ("device", args.device)) if v}
    config = dataclasses.replace(config, **overrides)
    if args.print_config:
        print(commented_yaml(config), end="")
        return 0
    report = run_pipeline(config)  # checks the config first, before any work
    print(summary_table(report))
    if not labeled_run(report):
        print(no_accuracy_line(report))
    if recovery_line(report):
        print(recovery_line(report))
    print(f"size reduction {100 * report['size_reduction']:.2f}% (real file); report: {config.out}/report.md")
    return 0
