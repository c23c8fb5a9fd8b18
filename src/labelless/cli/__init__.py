"""The ``labelless`` command line: one module per sub-command, each thin.

Every sub-command module has ``add_parser(subparsers)`` (declares its flags) and
``run(args) -> int`` (calls the library, prints). :func:`main` only dispatches and turns
errors into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ..errors import LabellessError
from . import decompress, export, inspect, layers, quantize, retrain, run, search, sweep, train

__all__ = ["main", "build_parser"]

COMMANDS = [run, layers, quantize, inspect, decompress, sweep, search, retrain, train, export]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="labelless",
        description="Compress trained PyTorch models with per-layer k-means weight sharing, "
        "then retrain them without labels.",
    )
    parser.add_argument("--version", action="version", version=f"labelless {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.run(args) or 0)
    except LabellessError as exc:
        return _fail(str(exc), 2)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except MemoryError:
        return _fail("out of memory: try a smaller --batch-size or --limit", 1)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    except Exception as exc:  # a bug: one line unless asked for the traceback
        if os.environ.get("LABELLESS_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (set LABELLESS_DEBUG=1 for the traceback)", 1)


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).split())
    print(f"labelless: error: {first}", file=sys.stderr)
    return code


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("labelless").setLevel(level)
    logging.getLogger("numba").setLevel(logging.WARNING)
