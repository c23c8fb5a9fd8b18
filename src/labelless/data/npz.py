"""Numpy archives (``npz:PATH``): images in NHW, NHWC or NCHW, labels optional."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..io import check_input_file
from .source import Source


def _keys(split: str, *names: str) -> list[str]:
    """Split-specific keys first (x_train, train_images, ...), then the plain ones."""
    specific = [form.format(n=name, s=split) for name in names for form in ("{n}_{s}", "{s}_{n}")]
    return specific + list(names)


def read_npz(path: Path, split: str) -> Source:
    check_input_file(path, "npz file", DataError)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{str(path)!r} is a single .npy array, not an .npz archive: np.savez it")
            return _npz_source(path, split, archive)
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {str(path)!r} as an .npz archive ({exc}): save it with np.savez") from None


def _npz_source(path: Path, split: str, archive: Any) -> Source:
    image_key = next((k for k in _keys(split, "images", "x", "X", "data") if k in archive.files), None)
    if image_key is None:
        raise DataError(f"{str(path)!r} has no images array for split {split!r} (keys: {archive.files}): "
                        f"store them under 'images' or 'x_{split}'")
    images = _npz_images(archive[image_key], path, image_key)
    label_key = next((k for k in _keys(split, "labels", "y", "Y", "targets") if k in archive.files), None)
    labels = _npz_labels(archive[label_key], len(images), path, label_key) if label_key else None
    class_key = next((k for k in ("classes", "class_names") if k in archive.files), None)
    classes = [str(c) for c in archive[class_key].tolist()] if class_key else None
    return Source(where=f"{path}[{image_key}]", images=images, labels=labels, classes=classes)


def _npz_images(array: np.ndarray, path: Path, key: str) -> Tensor:
    """NHW, NHWC or NCHW; uint8, or numbers in [0, 1] or [0, 255] -> (N, C, H, W) uint8."""
    where = f"{str(path)!r}[{key!r}]"
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif array.ndim != 4 or array.shape[1] not in (1, 3, 4):
        raise DataError(f"{where} has shape {array.shape}: expected N x H x W, N x H x W x C or N x C x H x W "
                        f"with 1, 3 or 4 channels")
    if len(array) == 0:
        raise DataError(f"{where} holds no images: give it some")
    return torch.from_numpy(np.ascontiguousarray(_to_uint8(array[:, :3], where)))


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{where} has dtype {array.dtype}: store pixels as uint8 or floats in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
        raise DataError(f"{where} has values in [{low}, {high}]: pixels must lie in [0, 1] or [0, 255]")
    scale = 255.0 if np.issubdtype(array.dtype, np.floating) and high <= 1.0 else 1.0
    return np.round(array * scale).astype(np.uint8)


def _npz_labels(array: np.ndarray, n: int, path: Path, key: str) -> Tensor:
    where = f"{str(path)!r}[{key!r}]"
    if array.ndim == 2 and array.shape[1] > 1:
        array = array.argmax(1)  # one-hot
    array = array.reshape(-1) if array.ndim == 2 else array
    if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{where} has shape {array.shape} {array.dtype}: expected {n} integer class labels")
    labels = array.astype(np.int64)
    if (labels != array).any() or (labels < 0).any():
        raise DataError(f"{where} must hold whole class numbers >= 0")
    return torch.from_numpy(labels)
