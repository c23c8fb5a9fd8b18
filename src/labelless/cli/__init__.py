"""The ``labelless`` command line: one module per sub-command, each thin.

Every sub-command module has ``add_parser(subparsers)`` (declares its flags) and
``run(args) -> int`` (calls the library, prints). :func:`main` only dispatches and turns
errors into one line on stderr and a non-zero exit code.

Under torchrun (``torchrun --nproc-per-node N -m labelless sweep ...``) :func:`main` joins the
process group for the length of the command (:func:`labelless.distributed.session`); only rank
0 prints results, logs at the chosen level and shows progress bars, the other ranks log
warnings and errors only, each line tagged with its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator, Sequence

from .. import distributed
from ..errors import LabellessError
from . import decompress, export, inspect, layers, models, quantize, retrain, run, search, sweep, train

__all__ = ["main", "build_parser"]

COMMANDS = [run, models, layers, quantize, inspect, decompress, sweep, search, retrain, train, export]
SPLIT_COMMANDS = ("sweep", "retrain", "run")  # the ones that share their work under torchrun


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="labelless",
        description="Compress trained PyTorch models with per-layer k-means weight sharing, "
        "then retrain them without labels.",
    )
    parser.add_argument("--version", action="version", version=f"labelless {__version__}")
    _add_verbosity(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.add_parser(subparsers)
    for sub in subparsers.choices.values():  # -v/-q also after the sub-command
        _add_verbosity(sub, default=argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log debugging detail")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings and errors only")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        _check_split(args.command)
        with distributed.session(), _only_rank_0_prints():
            return int(args.run(args) or 0)
    except LabellessError as exc:
        return _fail(str(exc), 2)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except MemoryError:
        return _fail("out of memory: try a smaller --batch-size or --limit (a sweep: smaller --clusters values)", 1)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    except Exception as exc:  # a bug: one line unless asked for the traceback
        if os.environ.get("LABELLESS_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (set LABELLESS_DEBUG=1 for the traceback)", 1)


def _check_split(command: str) -> None:
    """Refuse to run a command N times over when it cannot share its work."""
    if _several_processes() and command not in SPLIT_COMMANDS:
        raise LabellessError(f"`labelless {command}` does not split its work across processes: run it without "
                             f"torchrun (under torchrun: {', '.join(SPLIT_COMMANDS)})")


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).split())
    print(f"labelless: error: {_rank_tag()}{first}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _only_rank_0_prints() -> Iterator[None]:
    """Under torchrun, the other ranks' standard output goes nowhere (their errors still show)."""
    if distributed.is_main():
        yield
        return
    os.environ["LABELLESS_PROGRESS"] = "0"
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _several_processes() -> bool:
    """Whether torchrun started this process as one of several."""
    return distributed.launched() and os.environ.get("WORLD_SIZE", "1") != "1"


def _rank_tag() -> str:
    """``"[rank 1] "`` in a process torchrun started among several, else nothing."""
    return f"[rank {os.environ['RANK']}] " if _several_processes() else ""


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if os.environ.get("RANK", "0") != "0" and distributed.launched():
        level = max(level, logging.WARNING)  # the other ranks repeat rank 0's progress
    logging.basicConfig(level=level, format=f"%(levelname)s {_rank_tag()}%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("labelless").setLevel(level)
    logging.getLogger("numba").setLevel(logging.WARNING)
