"""The ``.lless`` file: a compressed model in one safetensors container, no pickle.

Layout (format version 2; a file without per-channel codebooks is written as version 1,
which is the same layout without the ``codebooks`` field)::

    safetensors file
      __metadata__["labelless"] = JSON header (below)
      <key>::codebook   F32|F16 (k,)      for each quantized tensor <key> (a state_dict key),
                        or (G, k)         with one codebook per group of output channels
      <key>::indices    U8 (bytes,)       bit-packed or ANS-coded indices; absent when k = 1
      <key>::counts     I64 (k,)          values per centroid; only with ANS coding
      <key>             F32|F16|...       every other state_dict tensor

    header = {
      "format": "labelless", "version": 1,
      "architecture": ModelSpec as a mapping, or null for a model given at load time,
      "plan": [rules], "layers": [{"index", "name", "type"}],
      "tensors": {<key>: {"kind": "quantized", "shape", "n_clusters", "bits", "coding",
                          "codebook_dtype", ["codebooks": G, only when G > 1]}
                        | {"kind": "dense", "shape", "dtype", "stored_dtype"}},
      "aliases": {<key>: <key it shares storage with>},
      "fp32_bytes": size of the model's fp32 state_dict saved as safetensors,
      "checksum": {"algorithm": "sha256",
                   "tensors": hex,   # over tensor names, dtypes, shapes and bytes
                   "header": hex}    # over this header without "checksum", sorted-key JSON
    }

Reading validates everything before building anything: sizes, types, limits, the checksum,
index ranges, and the architecture's shapes (built on the meta device first, so a lying
header cannot make it allocate a huge model). The checksums cover the tensors and the JSON
header; the header is also checked field by field and against the model it names; every failure is a
:class:`FileFormatError` (bench/fuzz_lless.py and tests/test_fileformat_fuzz.py attack it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from . import coding, layout, zoo
from .errors import FileFormatError, LabellessError, ModelError
from .io import atomic_path, check_input_file
from .layers import list_layers
from .layout import DTYPES, FORMAT, SAFETENSORS_DTYPES, layout_version, safetensors_size  # noqa: F401 (re-exported)
from .models import ModelSpec, build_model
from .quantize import install, quantized_tensors

__all__ = ["save", "load", "read", "inspect", "LlessFile", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 100_000
MAX_NDIM = 8
DEFAULT_MAX_PARAMS = 1 << 30
MAX_VALUES = 1 << 40  # values in one tensor, whatever the model: beyond any real file
MAX_CLUSTERS = 1 << 24
MAX_COUNT = 1 << 62  # any whole number in the header (shape, size, index)
_DTYPES = DTYPES  # the names a header may give a dtype
_CODINGS = ("packed", "ans")


@dataclass
class LlessFile:
    """A validated ``.lless`` file: its header and its tensors, not yet a model."""

    path: Path
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # safetensors names -> tensors, as stored
    file_bytes: int
    header_bytes: int  # the 8-byte length plus the safetensors JSON header
    stored_bytes: dict[str, int] = field(default_factory=dict)  # state_dict key -> data bytes

    @property
    def spec(self) -> ModelSpec | None:
        arch = self.header["architecture"]
        return None if arch is None else ModelSpec.from_dict(arch)


# -- writing -------------------------------------------------------------------------------


def save(
    model: nn.Module,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    codebook_dtype: str = "float32",
    dense_dtype: str = "float32",
    entropy: str = "none",
) -> dict[str, Any]:
    """Write ``model`` (quantized or not) to a ``.lless`` file; returns :func:`inspect`'s report.

    ``codebook_dtype``/``dense_dtype`` ``"float16"`` halve codebooks / other tensors (the
    loaded model then equals this one with those tensors rounded to fp16); ``entropy="ans"``
    entropy-codes the indices, losslessly.

    Example:
        >>> report = save(quantize(model, plan), "model.lless")
        >>> report["size_reduction"]
        0.87
    """
    for name, value, valid in (("codebook_dtype", codebook_dtype, ("float32", "float16")),
                               ("dense_dtype", dense_dtype, ("float32", "float16")),
                               ("entropy", entropy, ("none", "ans"))):
        if value not in valid:
            raise LabellessError(f"{name} must be one of {list(valid)}, got {value!r}")
    spec = spec or getattr(model, "labelless_spec", None)
    tensors, entries, aliases = _encode_state(model, codebook_dtype, dense_dtype, entropy)
    body = layout.header(architecture=None if spec is None else spec.to_dict(), plan=_plan_data(model),
                         layers=layer_table(model), entries=entries, aliases=aliases,
                         fp32_bytes=fp32_safetensors_bytes(model))
    header = layout.with_checksum(body, _digest(tensors), _header_digest(body))
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=layout.metadata(header))
    return inspect(path)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """The header's ``layers``: every quantizable layer's position, name and type."""
    return [{"index": l.index, "name": l.name, "type": l.type} for l in list_layers(model)]


def _plan_data(model: nn.Module) -> list | None:
    plan = getattr(model, "labelless_plan", None)
    return None if plan is None else plan.to_data()


def _encode_state(model: nn.Module, codebook_dtype: str, dense_dtype: str, entropy: str):
    quantized = quantized_tensors(model)
    by_storage = {(id(qt.centroids), id(qt.indices)): key for key, qt in quantized.items()}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for key, qt in quantized.items():
        first = by_storage[(id(qt.centroids), id(qt.indices))]
        if first != key:
            aliases[key] = first
            continue
        entries[key] = _encode_quantized(key, qt, codebook_dtype, entropy, tensors)
    quantized_names = {f"{key}_{suffix}" for key in quantized for suffix in ("centroids", "indices")}
    seen: dict[tuple[int, int, tuple], str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in quantized_names:
            continue
        value = value.detach()
        identity = (value.data_ptr(), value.numel(), tuple(value.stride()))
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        entries[key] = _encode_dense(key, value, dense_dtype, tensors)
    return tensors, entries, aliases


def _encode_quantized(key: str, qt, codebook_dtype: str, entropy: str, tensors: dict) -> dict:
    k = qt.n_clusters
    bits = coding.index_bits(k)
    indices = qt.indices.detach().cpu().numpy().reshape(-1)
    tensors[layout.codebook_name(key)] = qt.centroids.detach().cpu().to(_DTYPES[codebook_dtype]).contiguous()
    use_ans = entropy == "ans" and k > 1
    if use_ans:
        counts = np.bincount(indices, minlength=k).astype(np.int64)
        if (counts == 0).any():  # an unused centroid cannot be coded; it costs nothing to pack
            use_ans = False
    if use_ans:
        tensors[layout.indices_name(key)] = torch.from_numpy(coding.ans_encode(indices, counts))
        tensors[layout.counts_name(key)] = torch.from_numpy(counts)
    elif bits:
        tensors[layout.indices_name(key)] = torch.from_numpy(coding.pack(indices, bits))
    return layout.quantized_entry(list(qt.indices.shape), k, bits, "ans" if use_ans else "packed", codebook_dtype,
                                  qt.n_codebooks)


def _encode_dense(key: str, value: torch.Tensor, dense_dtype: str, tensors: dict) -> dict:
    stored = value.cpu().contiguous()
    if dense_dtype == "float16" and value.dtype == torch.float32:
        stored = stored.half()
    tensors[key] = stored.clone() if stored.data_ptr() == value.data_ptr() else stored
    return layout.dense_entry(list(value.shape), value.dtype, stored.dtype)


def _header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header without its checksum, as sorted-key compact JSON."""
    body = {k: v for k, v in header.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Size of the model's dense fp32 state_dict saved as a safetensors file (computed)."""
    shapes: dict[str, tuple[str, list[int], int]] = {}
    quantized = quantized_tensors(model)
    for key, qt in quantized.items():
        shapes[key] = ("F32", list(qt.indices.shape), qt.indices.numel() * 4)
    skip = {f"{key}_{s}" for key in quantized for s in ("centroids", "indices")}
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in skip:
            dtype = torch.float32 if value.is_floating_point() else value.dtype
            shapes[key] = (SAFETENSORS_DTYPES[dtype], list(value.shape), value.numel() * dtype.itemsize)
    return safetensors_size(shapes)


# -- reading -------------------------------------------------------------------------------


def read(path: str | Path) -> LlessFile:
    """Read and validate a ``.lless`` file without building a model.

    Raises :class:`FileFormatError` (a ``ValueError``) for anything truncated, corrupted,
    of another version, or inconsistent with itself.
    """
    path = check_input_file(path, ".lless file", FileFormatError)
    data = path.read_bytes()
    header_len, raw_header = _safetensors_header(data, path)
    header = _labelless_header(raw_header, path)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise FileFormatError(f"{path}: the tensor data is unreadable ({_short(exc)})") from None
    _validate_tensors(header, tensors, path)
    if _digest(tensors) != header["checksum"]["tensors"] or _header_digest(header) != header["checksum"]["header"]:
        raise FileFormatError(f"{path}: checksum mismatch: the file is corrupted; write it again")
    stored = _stored_bytes(header, tensors)
    return LlessFile(path, header, tensors, len(data), 8 + header_len, stored)


def _safetensors_header(data: bytes, path: Path) -> tuple[int, dict]:
    if len(data) < 8:
        raise FileFormatError(f"{path}: only {len(data)} bytes: truncated, or not a .lless file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES):
        raise FileFormatError(f"{path}: declares a {header_len}-byte header in a {len(data)}-byte file: truncated or not a .lless file")
    raw = _parse_json(data[8 : 8 + header_len])
    if raw is _INVALID:
        raise FileFormatError(f"{path}: the header is not valid JSON: corrupted, or not a .lless file")
    if not isinstance(raw, dict):
        raise FileFormatError(f"{path}: the header is not a JSON object: not a .lless file")
    return header_len, raw


_INVALID = object()


def _parse_json(text: str | bytes) -> Any:
    """The JSON value of ``text``, or ``_INVALID`` where Python's parser refuses it.

    Refused: bad UTF-8 or JSON, NaN/Infinity, integers over 4300 digits, nesting deeper
    than the recursion limit (json raises RecursionError there, quickly and cleanly).
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _INVALID


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _labelless_header(raw: dict, path: Path) -> dict:
    metadata = raw.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(FORMAT), str):
        raise FileFormatError(f"{path}: a safetensors file without a labelless header: not a .lless file")
    header = _parse_json(metadata[FORMAT])
    if header is _INVALID:
        raise FileFormatError(f"{path}: the labelless header is not valid JSON: the file is corrupted")
    try:
        _check_header(header)
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    return header


def _check_header(header: Any) -> None:
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
                f"alias {_quote(key)} points at no stored tensor")
    _check_layers(header["layers"])


def _check_version(version: Any) -> None:
    _expect(isinstance(version, int) and not isinstance(version, bool), "the header has no format version")
    if version not in READABLE_VERSIONS:
        raise FileFormatError(
            f"format version {_quote(version)} is not supported (this labelless reads versions "
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
            f"the architecture in the file is unusable ({_short(exc)}): the file is corrupted, "
            "or needs the labelless and torchvision that wrote it"
        ) from None


def _check_layers(layers: list) -> None:
    names: set[str] = set()
    for layer in layers:
        _expect(isinstance(layer, dict) and _is_count(layer.get("index")) and isinstance(layer.get("name"), str)
                and isinstance(layer.get("type"), str), "bad layer list")
        _expect(layer["name"] not in names, f"layer {_quote(layer['name'])} is listed twice")
        names.add(layer["name"])


def _check_entry(key: str, entry: Any, version: int) -> None:
    _expect(key != "" and "::" not in key and isinstance(entry, dict), f"bad tensor entry {_quote(key)}")
    shape = entry.get("shape")
    _expect(isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_count(d) for d in shape),
            f"tensor {_quote(key)} has a bad shape")
    _expect(math.prod(shape) <= MAX_VALUES, f"tensor {_quote(key)} is impossibly large")
    if entry.get("kind") == "quantized":
        _check_quantized_entry(key, entry, math.prod(shape), version)
    else:
        _expect(entry.get("kind") == "dense", f"tensor {_quote(key)} has an unknown kind")
        _check_dense_entry(key, entry)


def _check_quantized_entry(key: str, entry: dict, n_values: int, version: int) -> None:
    k, bits = entry.get("n_clusters"), entry.get("bits")
    _expect(_is_count(k) and 1 <= k <= MAX_CLUSTERS, f"tensor {_quote(key)} has a bad number of centroids")
    _expect(_is_count(bits) and bits == coding.index_bits(k), f"tensor {_quote(key)}: bits do not match its centroids")
    _expect(_is_one_of(entry.get("coding"), _CODINGS), f"tensor {_quote(key)} has an unknown index coding")
    _expect(_is_one_of(entry.get("codebook_dtype"), ("float32", "float16")),
            f"tensor {_quote(key)}: bad codebook dtype")
    _expect(k <= max(1, n_values), f"tensor {_quote(key)} has more centroids than values")
    if "codebooks" in entry:
        groups, shape = entry["codebooks"], entry["shape"]
        _expect(_is_count(groups) and 2 <= groups and len(shape) >= 2 and groups <= shape[0],
                f"tensor {_quote(key)} has a bad number of codebooks")
        _expect(version >= 2, f"tensor {_quote(key)} has per-channel codebooks in a version-1 file")


def _check_dense_entry(key: str, entry: dict) -> None:
    dtype, stored = entry.get("dtype"), entry.get("stored_dtype")
    _expect(_is_one_of(dtype, _DTYPES) and _is_one_of(stored, _DTYPES), f"tensor {_quote(key)}: bad dtype")
    # the writer stores every tensor as itself, or float32 as float16: anything else is a lie
    _expect(stored == dtype or (dtype, stored) == ("float32", "float16"),
            f"tensor {_quote(key)} is declared {dtype} but stored as {stored}")


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


def _quote(value: Any) -> str:
    """``repr(value)``, cut to fit in a one-line message (a file can hold huge names)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected_tensors(header: dict) -> dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | None]]:
    """safetensors name -> (allowed dtypes, exact shape or None for 1-D of any length)."""
    expected: dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | None]] = {}
    for key, entry in header["tensors"].items():
        if entry["kind"] == "dense":
            expected[key] = ((_DTYPES[entry["stored_dtype"]],), tuple(entry["shape"]))
            continue
        k, groups = entry["n_clusters"], entry.get("codebooks", 1)
        expected[layout.codebook_name(key)] = ((_DTYPES[entry["codebook_dtype"]],), (k,) if groups == 1 else (groups, k))
        if entry["coding"] == "ans":
            expected[layout.indices_name(key)] = ((torch.uint8,), None)
            expected[layout.counts_name(key)] = ((torch.int64,), (k,))
        elif entry["bits"]:
            n_bytes = coding.packed_size(math.prod(entry["shape"]), entry["bits"])
            expected[layout.indices_name(key)] = ((torch.uint8,), (n_bytes,))
    return expected


def _validate_tensors(header: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = _expected_tensors(header)
    extra = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if extra or missing:
        raise FileFormatError(f"{path}: header and data disagree (missing {_quote(missing[:3])}, "
                              f"unexpected {_quote(extra[:3])}): the file is corrupted")
    for name, (dtypes, shape) in expected.items():
        tensor = tensors[name]
        ok = tensor.dtype in dtypes and (tuple(tensor.shape) == shape if shape is not None else tensor.dim() == 1)
        if not ok:
            raise FileFormatError(f"{path}: tensor {_quote(name)} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  "not what the header declares: the file is corrupted")


def _stored_bytes(header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    stored = {}
    for key, entry in header["tensors"].items():
        names = [key] if entry["kind"] == "dense" else [f"{key}::{part}" for part in ("codebook", "indices", "counts")]
        stored[key] = sum(tensors[n].numel() * tensors[n].element_size() for n in names if n in tensors)
    return stored


# -- loading into a model ------------------------------------------------------------------


def load(path: str | Path, model: nn.Module | None = None, *, max_params: int = DEFAULT_MAX_PARAMS,
         custom: str | None = None) -> nn.Module:
    """Rebuild the model saved in a ``.lless`` file.

    Quantized tensors come back as codebook + indices (so the model can be retrained or
    saved again); outputs are bit-identical to the model that was saved. A file written
    from a custom ``nn.Module`` needs that module (freshly constructed) as ``model``; one whose
    spec names a custom class (``package.module:ClassName``) is rebuilt from it, with the
    constructor arguments it records, only when ``custom`` names that same class: loading a
    file never imports code on its own.

    Example:
        >>> model = load("model.lless")
        >>> logits = model.eval()(images)
        >>> mine = load("net.lless", custom="mymodels:Net")
    """
    lless = read(path)
    target = _target_model(lless, model or _custom_model(lless, custom), max_params)
    _fill(target, lless)
    target.eval()
    return target


def _custom_model(lless: LlessFile, custom: str | None) -> nn.Module | None:
    """The custom class the file's spec names, built, when the caller named it too."""
    try:
        spec = lless.spec
    except ModelError:
        return None  # _target_model says what is wrong with it
    if spec is None or zoo.model_source(spec.name) != "custom":
        return None
    if custom != spec.name:
        raise LabellessError(f"{lless.path} holds the custom model {spec.name}: labelless imports no code a file "
                             f"names; name it yourself (--model {spec.name} on the command line, "
                             f"load(path, custom=\"{spec.name}\") in Python)")
    return build_model(spec)


def _target_model(lless: LlessFile, model: nn.Module | None, max_params: int) -> nn.Module:
    if model is not None:
        _check_shapes(model, lless)
        return model
    try:
        spec = lless.spec
    except ModelError as exc:
        raise FileFormatError(f"{lless.path}: the architecture in the file is unusable: {exc}") from None
    if spec is None:
        raise LabellessError(f"{lless.path} holds a custom model: pass a freshly built one, load(path, model=...)")
    skeleton = _meta_model(spec, lless.path)
    n_params = sum(v.numel() for v in skeleton.state_dict().values())
    if n_params > max_params:
        raise FileFormatError(f"{lless.path}: declares a model of {n_params} values, above the limit of {max_params}")
    _check_shapes(skeleton, lless)
    persistent = set(skeleton.state_dict())
    if any(name not in persistent for name, _ in skeleton.named_buffers()):
        return build_model(spec)  # non-persistent buffers need their real initial values
    return skeleton.to_empty(device="cpu")


def _meta_model(spec: ModelSpec, path: Path) -> nn.Module:
    """The architecture without memory: its shapes are checked before anything is allocated."""
    try:
        return build_model(spec, device="meta")
    except Exception as exc:  # torchvision code that cannot run on the meta device (regnet_*)
        raise FileFormatError(
            f"{path}: labelless cannot rebuild {spec.name} without allocating it ({_short(exc)}): "
            "please report this as a labelless bug; load(path, model=...) with a freshly built model works"
        ) from None


def _check_shapes(model: nn.Module, lless: LlessFile) -> None:
    entries, aliases = lless.header["tensors"], lless.header["aliases"]
    state = model.state_dict()
    expected = {k: list(v.shape) for k, v in state.items()}
    declared = {k: e["shape"] for k, e in entries.items()}
    declared.update({k: entries[t]["shape"] for k, t in aliases.items()})
    if expected != declared:
        diff = sorted(set(expected) ^ set(declared)) or [k for k in expected if expected[k] != declared[k]]
        raise FileFormatError(
            f"{lless.path}: its tensors do not fit the model it names ({_quote(diff[:3])[1:-1]}): "
            "the file is corrupted or was written for another architecture"
        )
    _check_kinds(model, state, lless)
    _check_sharing(model, lless)


def _check_sharing(model: nn.Module, lless: LlessFile) -> None:
    """One tensor of the model (a shared module) must be one tensor in the file, not several."""
    aliases = lless.header["aliases"]
    first_name: dict[int, tuple[str, str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        source = aliases.get(key, key)
        first, first_source = first_name.setdefault(id(value), (key, source))
        if first_source != source and value.numel():  # the writer stores empty tensors apart
            raise FileFormatError(f"{lless.path}: {_quote(key)} and {_quote(first)} are one tensor in the model "
                                  "but two in the file: the file is corrupted or was written for another model")


def _check_kinds(model: nn.Module, state: dict[str, torch.Tensor], lless: LlessFile) -> None:
    """Quantized tensors must be parameters (a buffer would keep uninitialised memory), and
    dense tensors of the model's dtype (a copy into another dtype would change the values)."""
    entries, aliases = lless.header["tensors"], lless.header["aliases"]
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key, value in state.items():
        entry = entries[aliases.get(key, key)]
        if entry["kind"] == "quantized" and key not in params:
            raise FileFormatError(f"{lless.path}: {_quote(key)} is quantized in the file but is not a "
                                  "parameter of the model: the file is corrupted")
        if entry["kind"] == "dense" and _DTYPES[entry["dtype"]] != value.dtype:
            raise FileFormatError(f"{lless.path}: {_quote(key)} is {entry['dtype']} in the file but {value.dtype} "
                                  "in the model: the file is corrupted or was written for another model")


def _fill(model: nn.Module, lless: LlessFile) -> None:
    entries, aliases = lless.header["tensors"], lless.header["aliases"]
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module under each name
    built: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for key in list(entries) + list(aliases):
        source = aliases.get(key, key)
        entry = entries[source]
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if entry["kind"] == "quantized":
            if source not in built:
                built[source] = _decode_quantized(source, entry, lless)
            install(module, name, *built[source])
        else:
            value = lless.tensors[source].to(_DTYPES[entry["dtype"]])
            target = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
            with torch.no_grad():
                target.copy_(value)


def _decode_quantized(key: str, entry: dict, lless: LlessFile) -> tuple[nn.Parameter, torch.Tensor]:
    centroids = lless.tensors[layout.codebook_name(key)].float()  # (k,) or (G, k)
    if not torch.isfinite(centroids).all():
        raise FileFormatError(f"{lless.path}: tensor {_quote(key)} has non-finite centroids: the file is corrupted")
    try:
        indices = _decode_indices(key, entry, lless.tensors)  # (n_values,)
    except FileFormatError as exc:
        raise FileFormatError(f"{lless.path}: tensor {_quote(key)}: {exc}") from None
    return nn.Parameter(centroids, requires_grad=False), torch.from_numpy(indices).view(entry["shape"])


def _decode_indices(key: str, entry: dict, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    k, bits, n_values = entry["n_clusters"], entry["bits"], math.prod(entry["shape"])
    dtype = np.uint8 if k <= 256 else (np.int16 if k <= 32768 else np.int32)
    if bits == 0:
        return np.zeros(n_values, dtype)
    data = tensors[layout.indices_name(key)].numpy()
    if entry["coding"] == "ans":
        return coding.ans_decode(data, tensors[layout.counts_name(key)].numpy(), n_values, dtype)
    return coding.unpack(data, bits, n_values, k, dtype)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


# -- sizes ---------------------------------------------------------------------------------


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
