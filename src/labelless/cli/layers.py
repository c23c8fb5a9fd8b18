"""``labelless layers``: the numbering plans use (index, name, type, shape, params)."""

from __future__ import annotations

import argparse

from ..layers import list_layers
from ..report import layers_table
from .common import add_model_args, model_from_args, print_json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("layers", help="list the quantizable layers and their numbering")
    add_model_args(parser, weights=False)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    layers = list_layers(model_from_args(args))
    if args.json:
        print_json([layer.to_dict() for layer in layers])
    else:
        print(layers_table(layers))
    return 0
