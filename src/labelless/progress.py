"""Progress bars for long work: shown on a terminal, silent otherwise."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar on stderr when it is a terminal.

    ``LABELLESS_PROGRESS=1`` forces the bar on, ``0`` off.
    """
    forced = os.environ.get("LABELLESS_PROGRESS")
    disable = not sys.stderr.isatty() if forced is None else forced == "0"
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True)
