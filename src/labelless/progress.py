"""Progress for long work: a bar on a terminal, heartbeat log lines otherwise.

On a terminal a tqdm bar shows the work and vanishes when it is done, leaving one log line
(what was done, how long it took) for any work that took :data:`SUMMARY_SECONDS` or more. Piped
to a file, where a bar would be noise, a log line every :data:`HEARTBEAT_SECONDS` says how far the
work is, its rate and the time left, so that a long stage never looks hung.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "HEARTBEAT_SECONDS"]

log = logging.getLogger(__name__)

T = TypeVar("T")
HEARTBEAT_SECONDS = 30.0  # between two progress lines when not on a terminal
SUMMARY_SECONDS = 5.0  # work at least this long leaves a line when its bar goes


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar on stderr when it is a terminal, else in heartbeats.

    ``LABELLESS_PROGRESS=1`` forces the bar on, ``0`` off (heartbeats then).
    """
    forced = os.environ.get("LABELLESS_PROGRESS")
    bar = sys.stderr.isatty() if forced is None else forced != "0"
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not bar:
        return _heartbeats(iterable, desc, total, unit)
    return _summarised(tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True),
                       desc, unit)


def _heartbeats(iterable: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= HEARTBEAT_SECONDS:
            last = now
            log.info("%s: %s", desc, _status(done, total, unit, now - start))
    if last > start:  # it spoke on the way: say that it ended
        log.info("%s: done, %d %s in %s", desc, done, unit, _duration(time.perf_counter() - start))


def _summarised(bar: Iterable[T], desc: str, unit: str) -> Iterator[T]:
    start = time.perf_counter()
    done = 0
    for item in bar:
        yield item
        done += 1
    seconds = time.perf_counter() - start
    if seconds >= SUMMARY_SECONDS:
        log.info("%s: %d %s in %s", desc, done, unit, _duration(seconds))


def _status(done: int, total: int | None, unit: str, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    if not total:
        return f"{done} {unit}, {rate:.2f} {unit}/s"
    left = (total - done) / rate if rate > 0 else float("inf")
    return f"{done}/{total} {unit} ({100 * done / total:.0f}%), {rate:.2f} {unit}/s, about {_duration(left)} left"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
