"""The ``.lless`` layout: the one place that says what a file's header and tensors look like.

A ``.lless`` file is a safetensors file whose ``__metadata__`` holds one JSON header under the
key ``"labelless"``. The writer (:mod:`labelless.fileformat`) and the sizer
(:mod:`labelless.sizing`, which computes a file's bytes from shapes alone) both build their
header entries, the header and the stored tensors' names from these functions, so the size the
search sees is the size the writer writes. ``docs/FORMAT.md`` describes the same layout.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .errors import LabellessError

__all__ = [
    "FORMAT", "DTYPES", "SAFETENSORS_DTYPES", "dtype_name", "dense_entry", "quantized_entry", "header",
    "layout_version", "with_checksum", "metadata", "safetensors_size", "codebook_name", "indices_name", "counts_name",
]

FORMAT = "labelless"  # the metadata key, and the header's "format"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
          "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ALIGN = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def codebook_name(key: str) -> str:
    return f"{key}::codebook"


def indices_name(key: str) -> str:
    return f"{key}::indices"


def counts_name(key: str) -> str:  # symbol counts of ANS-coded indices
    return f"{key}::counts"


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise LabellessError(f"labelless cannot store tensors of dtype {dtype}")


def dense_entry(shape: list[int], dtype: torch.dtype, stored: torch.dtype) -> dict[str, Any]:
    """The header entry of a tensor stored as it is (``stored``: its dtype in the file)."""
    return {"kind": "dense", "shape": list(shape), "dtype": dtype_name(dtype), "stored_dtype": dtype_name(stored)}


def quantized_entry(shape: list[int], k: int, bits: int, coding: str, codebook_dtype: str,
                    codebooks: int = 1) -> dict[str, Any]:
    """The header entry of a quantized tensor: ``codebooks`` codebooks of ``k`` centroids and
    one index per value, ``bits`` wide when ``coding`` is ``"packed"``."""
    entry = {"kind": "quantized", "shape": list(shape), "n_clusters": k, "bits": bits, "coding": coding,
             "codebook_dtype": codebook_dtype}
    if codebooks > 1:
        entry["codebooks"] = codebooks
    return entry


def layout_version(entries: dict[str, Any]) -> int:
    """The lowest format version that holds these tensors: 2 only for per-channel codebooks."""
    return 2 if any(entry.get("codebooks", 1) > 1 for entry in entries.values()) else 1


def header(*, architecture: dict | None, plan: list | None, layers: list[dict], entries: dict[str, Any],
           aliases: dict[str, str], fp32_bytes: int) -> dict[str, Any]:
    """The header without its checksum (see :func:`with_checksum`)."""
    return {"format": FORMAT, "version": layout_version(entries), "architecture": architecture, "plan": plan,
            "layers": layers, "tensors": entries, "aliases": aliases, "fp32_bytes": fp32_bytes}


def with_checksum(body: dict[str, Any], tensors_digest: str, header_digest: str) -> dict[str, Any]:
    """``body`` with its sha256 checksums (64 hex digits each: the sizer passes zeros)."""
    return dict(body, checksum={"algorithm": "sha256", "tensors": tensors_digest, "header": header_digest})


def metadata(full_header: dict[str, Any]) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a file with this header."""
    return {FORMAT: json.dumps(full_header)}


def safetensors_size(shapes: dict[str, tuple[str, list[int], int]], metadata: dict[str, str] | None = None) -> int:
    """Bytes of a safetensors file holding tensors ``name -> (dtype, shape, nbytes)``.

    Mirrors the writer: tensors sorted by dtype size (largest first) then name, a compact
    JSON header padded with spaces to a multiple of 8 bytes.
    """
    order = sorted(shapes, key=lambda n: (-_ALIGN[shapes[n][0]], n))
    entries, offset = [], 0
    for name in order:
        dtype, shape, nbytes = shapes[name]
        entries.append(f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":{json.dumps(shape, separators=(",", ":"))},'
                       f'"data_offsets":[{offset},{offset + nbytes}]}}')
        offset += nbytes
    if metadata:
        entries.insert(0, '"__metadata__":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))
    size = len(("{" + ",".join(entries) + "}").encode())
    return 8 + size + (-size % 8) + offset


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header without its checksum, as sorted-key compact JSON."""
    body = {k: v for k, v in header.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every stored tensor: its name, dtype, shape and bytes, in name order."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()
