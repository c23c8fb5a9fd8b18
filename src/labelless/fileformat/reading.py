"""Reading a ``.lless`` file: the safetensors container, the labelless header, the checksums."""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import FileFormatError
from ..io import check_input_file
from ..layout import FORMAT, header_digest, tensors_digest
from ..models import ModelSpec
from .checks import MAX_HEADER_BYTES, check_header, short, stored_bytes, validate_tensors

log = logging.getLogger(__name__)


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
        raise FileFormatError(f"{path}: the tensor data is unreadable ({short(exc)})") from None
    validate_tensors(header, tensors, path)
    if tensors_digest(tensors) != header["checksum"]["tensors"] or header_digest(header) != header["checksum"]["header"]:
        raise FileFormatError(f"{path}: checksum mismatch: the file is corrupted; write it again")
    stored = stored_bytes(header, tensors)
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
        check_header(header)
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    return header
