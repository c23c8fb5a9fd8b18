"""Validating a ``.lless`` header and its tensors, field by field, before anything is built."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from .. import coding, layout
from ..errors import FileFormatError
from ..layout import DTYPES, FORMAT
from ..models import ModelSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 100_000
MAX_NDIM = 8
MAX_VALUES = 1 << 40  # values in one tensor, whatever the model: beyond any real file
MAX_CLUSTERS = 1 << 24
MAX_COUNT = 1 << 62  # any whole number in the header (shape, size, index)
_CODINGS = ("packed", "ans")


def check_header(header: Any) -> None:
    _expect(isinstance(header, dict) and header.get("format") == FORMAT, "not a labelless header")
    _check_version(header.get("version"))
    for name, kind in (("tensors", dict), ("aliases", dict), ("layers", list), ("checksum", dict)):
        _expect(isinstance(header.get(name), kind), f"header field {name!r} is missing or not a {kind.__name__}")
    _expect("architecture" in header, "header field 'architecture' is missing")
    _check_architecture(header["architecture"])
    _expect("plan" in header and (header["plan"] is None or isinstance(header["plan"], list)), "bad plan")
    _expect(_is_count(header.get("fp32_bytes")), "bad fp32_bytes")
    _expect(header["checksum"].get("algorithm") == "sha256", "the checksum is not sha256")
    _expect(_is_hex_digest(header["checksum"].get("tensors")), "the header has no sha256 checksum")
    _expect(_is_hex_digest(header["checksum"].get("header")), "the header has no sha256 checksum of itself")
    _expect(len(header["tensors"]) + len(header["aliases"]) <= MAX_TENSORS, "too many tensors")
    for key, entry in header["tensors"].items():
        _check_entry(key, entry, header["version"])
    for key, target in header["aliases"].items():
        _expect(isinstance(target, str) and target in header["tensors"] and key not in header["tensors"],
                f"alias {quote(key)} points at no stored tensor")
    _check_layers(header["layers"])


def _check_version(version: Any) -> None:
    _expect(isinstance(version, int) and not isinstance(version, bool), "the header has no format version")
    if version not in READABLE_VERSIONS:
        raise FileFormatError(
            f"format version {quote(version)} is not supported (this labelless reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}): use the labelless release that wrote it"
        )


def _check_architecture(arch: Any) -> None:
    if arch is None:
        return
    _expect(isinstance(arch, dict), "the architecture is not a mapping")
    # ModelSpec takes any truthy small_input and float("nan") means; a file must be exact
    _expect(isinstance(arch.get("small_input", False), bool), "the architecture's small_input is not true/false")
    for name in ("mean", "std"):
        values = arch.get(name, [])
        _expect(isinstance(values, list) and all(_is_finite_number(v) for v in values),
                f"the architecture's {name} is not a list of finite numbers")
    try:
        ModelSpec.from_dict(arch)
    except (ValueError, TypeError, OverflowError) as exc:  # ModelError, or float() refusing a mean/std
        raise FileFormatError(
            f"the architecture in the file is unusable ({short(exc)}): the file is corrupted, "
            "or needs the labelless and torchvision that wrote it"
        ) from None


def _check_layers(layers: list) -> None:
    names: set[str] = set()
    for layer in layers:
        _expect(isinstance(layer, dict) and _is_count(layer.get("index")) and isinstance(layer.get("name"), str)
                and isinstance(layer.get("type"), str), "bad layer list")
        _expect(layer["name"] not in names, f"layer {quote(layer['name'])} is listed twice")
        names.add(layer["name"])


def _check_entry(key: str, entry: Any, version: int) -> None:
    _expect(key != "" and "::" not in key and isinstance(entry, dict), f"bad tensor entry {quote(key)}")
    shape = entry.get("shape")
    _expect(isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_count(d) for d in shape),
            f"tensor {quote(key)} has a bad shape")
    _expect(math.prod(shape) <= MAX_VALUES, f"tensor {quote(key)} is impossibly large")
    if entry.get("kind") == "quantized":
        _check_quantized_entry(key, entry, math.prod(shape), version)
    else:
        _expect(entry.get("kind") == "dense", f"tensor {quote(key)} has an unknown kind")
        _check_dense_entry(key, entry)


def _check_quantized_entry(key: str, entry: dict, n_values: int, version: int) -> None:
    k, bits = entry.get("n_clusters"), entry.get("bits")
    _expect(_is_count(k) and 1 <= k <= MAX_CLUSTERS, f"tensor {quote(key)} has a bad number of centroids")
    _expect(_is_count(bits) and bits == coding.index_bits(k), f"tensor {quote(key)}: bits do not match its centroids")
    _expect(_is_one_of(entry.get("coding"), _CODINGS), f"tensor {quote(key)} has an unknown index coding")
    _expect(_is_one_of(entry.get("codebook_dtype"), ("float32", "float16")),
            f"tensor {quote(key)}: bad codebook dtype")
    _expect(k <= max(1, n_values), f"tensor {quote(key)} has more centroids than values")
    if "codebooks" in entry:
        groups, shape = entry["codebooks"], entry["shape"]
        _expect(_is_count(groups) and 2 <= groups and len(shape) >= 2 and groups <= shape[0],
                f"tensor {quote(key)} has a bad number of codebooks")
        _expect(version >= 2, f"tensor {quote(key)} has per-channel codebooks in a version-1 file")


def _check_dense_entry(key: str, entry: dict) -> None:
    dtype, stored = entry.get("dtype"), entry.get("stored_dtype")
    _expect(_is_one_of(dtype, DTYPES) and _is_one_of(stored, DTYPES), f"tensor {quote(key)}: bad dtype")
    # the writer stores every tensor as itself, or float32 as float16: anything else is a lie
    _expect(stored == dtype or (dtype, stored) == ("float32", "float16"),
            f"tensor {quote(key)} is declared {dtype} but stored as {stored}")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise FileFormatError(f"{message}: the file is corrupted or not a .lless file")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < 1 << 53  # math.isfinite(10**400) raises OverflowError
    return isinstance(value, float) and math.isfinite(value)


def _is_one_of(value: Any, names) -> bool:
    return isinstance(value, str) and value in names


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def quote(value: Any) -> str:
    """``repr(value)``, cut to fit in a one-line message (a file can hold huge names)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected_tensors(header: dict) -> dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | None]]:
    """safetensors name -> (allowed dtypes, exact shape or None for 1-D of any length)."""
    expected: dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | None]] = {}
    for key, entry in header["tensors"].items():
        if entry["kind"] == "dense":
            expected[key] = ((DTYPES[entry["stored_dtype"]],), tuple(entry["shape"]))
            continue
        k, groups = entry["n_clusters"], entry.get("codebooks", 1)
        expected[layout.codebook_name(key)] = ((DTYPES[entry["codebook_dtype"]],), (k,) if groups == 1 else (groups, k))
        if entry["coding"] == "ans":
            expected[layout.indices_name(key)] = ((torch.uint8,), None)
            expected[layout.counts_name(key)] = ((torch.int64,), (k,))
        elif entry["bits"]:
            n_bytes = coding.packed_size(math.prod(entry["shape"]), entry["bits"])
            expected[layout.indices_name(key)] = ((torch.uint8,), (n_bytes,))
    return expected


def validate_tensors(header: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = _expected_tensors(header)
    extra = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if extra or missing:
        raise FileFormatError(f"{path}: header and data disagree (missing {quote(missing[:3])}, "
                              f"unexpected {quote(extra[:3])}): the file is corrupted")
    for name, (dtypes, shape) in expected.items():
        tensor = tensors[name]
        ok = tensor.dtype in dtypes and (tuple(tensor.shape) == shape if shape is not None else tensor.dim() == 1)
        if not ok:
            raise FileFormatError(f"{path}: tensor {quote(name)} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  "not what the header declares: the file is corrupted")


def stored_bytes(header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    stored = {}
    for key, entry in header["tensors"].items():
        names = [key] if entry["kind"] == "dense" else [f"{key}::{part}" for part in ("codebook", "indices", "counts")]
        stored[key] = sum(tensors[n].numel() * tensors[n].element_size() for n in names if n in tensors)
    return stored


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
