"""``labelless inspect``: per-layer sizes of a .lless file, adding up to its size on disk."""

from __future__ import annotations

import argparse

from ..errors import FileFormatError
from ..fileformat import inspect
from ..io import check_input_file
from ..report import inspect_table
from .common import print_json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="per-layer table and totals of a .lless file")
    parser.add_argument("file", help="a .lless file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = inspect(check_input_file(args.file, ".lless file", FileFormatError))
    if args.json:
        print_json(report)
    else:
        print(inspect_table(report))
    return 0
