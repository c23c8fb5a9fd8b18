"""``labelless decompress``: the dense weights of a .lless file as a safetensors state_dict."""

from __future__ import annotations

import argparse
from pathlib import Path

import safetensors.torch

from ..errors import FileFormatError
from ..fileformat import load
from ..io import atomic_path, check_input_file, check_output_dir
from ..quantize import dequantize
from ..report import human_bytes
from .common import add_custom_arg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("decompress", help="write the dense weights of a .lless file")
    parser.add_argument("file", help="a .lless file")
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    add_custom_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    dense = dequantize(load(check_input_file(args.file, ".lless file", FileFormatError), custom=args.custom))
    state = {key: value.detach().contiguous().clone() for key, value in dense.state_dict().items()}
    with atomic_path(args.output) as tmp:
        safetensors.torch.save_file(state, str(tmp))
    print(f"wrote {len(state)} dense tensors to {args.output} ({human_bytes(Path(args.output).stat().st_size)})")
    return 0
