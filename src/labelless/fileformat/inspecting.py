"""Sizes of a ``.lless`` file: per layer, other tensors and header, adding up to the file."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .. import coding
from ..errors import FileFormatError
from .reading import read

log = logging.getLogger(__name__)


def inspect(path: str | Path) -> dict[str, Any]:
    """Sizes of a ``.lless`` file: per layer, other tensors and header add up to the file.

    ``bytes`` is what each layer takes on disk; ``packed_bytes`` what it would take with
    plain bit-packed indices (equal unless the indices are ANS-coded).
    """
    lless = read(path)
    header, stored = lless.header, lless.stored_bytes
    rows, claimed = [], set()
    for layer in header["layers"]:
        keys = [f"{layer['name']}.{p}" if layer["name"] else p for p in ("weight", "bias")]
        claimed.update(keys)
        rows.append(_layer_row(layer, keys, header, stored))
    other = sum(n for key, n in stored.items() if key not in claimed)
    total = lless.header_bytes + sum(r["bytes"] for r in rows) + other
    if total != lless.file_bytes:  # cannot happen for a file that passed read()
        raise FileFormatError(f"{path}: sizes do not add up ({total} vs {lless.file_bytes} bytes)")
    packed_total = total + sum(r["packed_bytes"] - r["bytes"] for r in rows)
    fp32 = header["fp32_bytes"]
    return {
        "path": str(path),
        "architecture": header["architecture"],
        "plan": header["plan"],
        "total_bytes": total,
        "packed_total_bytes": packed_total,
        "fp32_bytes": fp32,
        "size_reduction": 1 - total / fp32 if fp32 else 0.0,
        "header_bytes": lless.header_bytes,
        "other_bytes": other,
        "layers": rows,
    }


def _layer_row(layer: dict, keys: list[str], header: dict, stored: dict[str, int]) -> dict[str, Any]:
    entries, aliases = header["tensors"], header["aliases"]
    row = {"index": layer["index"], "name": layer["name"], "type": layer["type"], "n_params": 0,
           "weights_clusters": None, "bias_clusters": None, "bytes": 0, "packed_bytes": 0}
    for key, field_name in zip(keys, ("weights_clusters", "bias_clusters")):
        entry = entries.get(aliases.get(key, key))
        if entry is None:
            continue
        n_values = math.prod(entry["shape"])
        row["n_params"] += n_values
        own = 0 if key in aliases else stored[key]
        row["bytes"] += own
        row["packed_bytes"] += own
        if entry["kind"] == "quantized":
            row[field_name] = entry["n_clusters"]
            if entry["coding"] == "ans" and key not in aliases:
                codebook = entry.get("codebooks", 1) * entry["n_clusters"] * (2 if entry["codebook_dtype"] == "float16" else 4)
                row["packed_bytes"] += codebook + coding.packed_size(n_values, entry["bits"]) - own
    return row
