"""``labelless models``: the torchvision classifiers ``--model`` accepts."""

from __future__ import annotations

import argparse

from ..models import available_models
from .common import print_json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the model names --model accepts (torchvision classifiers)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of one name per line")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = available_models()
    if args.json:
        print_json(names)
    else:
        print("\n".join(names))
    return 0
