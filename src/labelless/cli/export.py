"""``labelless export``: a .lless file as an ONNX model that keeps its codebooks and packed indices."""

from __future__ import annotations

import argparse
import logging

from ..errors import FileFormatError
from ..export import DEFAULT_OPSET, EXPORTERS, MAX_OPSET, export_onnx
from ..io import check_input_file
from ..report import human_bytes
from .common import add_custom_arg, print_json

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write an ONNX model that stays compressed (or a dense one)")
    parser.add_argument("file", help="a .lless file")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--dense", action="store_true",
                        help="plain fp32 weights, for tools that cannot run the compressed graph")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {DEFAULT_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET}; --dense allows 13+)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto",
                        help="torch's exporter: auto (TorchScript where torch has it), dynamo (needs onnxscript)")
    parser.add_argument("--input-size", type=int, default=None, metavar="PX",
                        help="export at this height and width (default the model's own); height and width stay "
                             "dynamic where the network allows it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_custom_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_input_file(args.file, ".lless file", FileFormatError)
    report = export_onnx(args.file, args.output, dense=args.dense, opset=args.opset, exporter=args.exporter,
                         input_size=args.input_size, custom=args.custom)
    if args.json:
        print_json(report)
    else:
        kind = "dense" if report["dense"] else "compressed"
        print(f"{report['path']}: {kind} ONNX (opset {report['opset']}), {human_bytes(report['onnx_bytes'])} "
              f"({report['onnx_bytes']} bytes) = {report['ratio']:.3f} x the .lless file "
              f"({report['lless_bytes']} bytes)")
        if len(report["files"]) > 1:
            print(f"its tensors are in {report['files'][1]} (past protobuf's 2 GiB): keep the two files together")
    return 0
