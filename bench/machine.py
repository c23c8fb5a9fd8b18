"""What a bench's CPU timings depend on, in one line: the CPU model and its cores."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    """``"Intel(R) Xeon(R) Processor, 2 cores"``: the CPU the numbers were measured on."""
    return f"{cpu_name()}, {os.cpu_count()} cores"
