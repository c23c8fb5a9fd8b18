"""Opening a data spec: parse it, read its source, take the seeded subset, fit size and channels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import DataError
from ..io import check_input_file
from .arrays import array_channels, fit_array
from .folders import check_folder, folder_set, read_imagefolder, read_images, readable
from .imageset import ImageSet
from .named import read_digits, read_fashion, read_mnist
from .npz import read_npz
from .source import Source

log = logging.getLogger(__name__)

SPEC_FORMS = "fashion-mnist, mnist, digits, imagefolder:PATH, images:PATH, npz:PATH"
SPLITS = ("train", "test")


def open_images(spec: str, *, split: str = "train", labeled: bool = False, size: int | None = None,
                channels: int | None = None, limit: int | None = None, seed: int = 0,
                skip_unreadable: bool = False, after: int = 0) -> ImageSet:
    """Open the images a spec names as an :class:`ImageSet` of uint8 ``(C, H, W)`` images.

    ``size``: folders are decoded with the shorter side resized to ``size`` and centre-cropped to
    ``size x size`` (required when their images differ in size). Arrays in memory are cropped to a
    square and shrunk to ``size`` but never enlarged: :class:`Preprocess` enlarges them on the
    device, which keeps e.g. 60,000 Fashion-MNIST images small when a model wants 224 px.
    ``channels``: 1 (grayscale) or 3 (RGB); None keeps the source's own. ``limit``: a seeded
    random subset of that many images, kept in the source's order (the same seed gives the same
    subset, and a smaller limit a subset of a larger one). ``after``: skip the first ``after``
    images of that seeded draw, so that ``limit=m, after=n`` is disjoint from ``limit=n`` (images
    held apart from another stage's). ``skip_unreadable``: decode every file
    of a folder once and leave out those that fail, all named in one warning (by default the
    first such file is an error).

    Example:
        >>> train = open_images("fashion-mnist", labeled=True, limit=5000, seed=1)
        >>> photos = open_images("images:~/photos", size=224, channels=3).unlabeled()
    """
    _check_options(split, size, channels, limit)
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise DataError(f"after must be a whole number >= 0, got {after!r}")
    kind, path = _parse(spec)
    source = _READERS[kind](path, split)
    if labeled and source.labels is None:
        raise DataError(f"{spec} has no labels: use imagefolder:PATH (one subfolder per class) or an npz with "
                        f"a `labels` array for labelled data, or open it with labeled=False")
    keep = _subset(len(source), limit, seed, after)
    if keep is not None and not len(keep):
        raise DataError(f"{spec} ({split}) has {len(source)} images: none is left after the first {after} of the "
                        "seeded draw; give more images or smaller limits")
    labels = source.labels[keep] if source.labels is not None and keep is not None else source.labels
    if source.images is not None:
        images = source.images if keep is None else source.images[keep]
        images = array_channels(fit_array(images, size), channels, spec)  # shrink first, then add channels
        data = ImageSet(spec, images.contiguous(), labels, source.classes, labeled=labeled)
    else:
        files = source.files if keep is None else [source.files[i] for i in keep.tolist()]
        if skip_unreadable:
            files, labels = readable(spec, files, labels)
        data = folder_set(spec, files, labels, source.classes, labeled, size, channels)
    log.info("%s (%s): %d images %s from %s", spec, split, len(data), "x".join(map(str, data.image_shape)),
             source.where)
    return data


def describe(spec: str) -> str:
    """One line on what a spec names, without reading any image.

    Example:
        >>> describe("imagefolder:/data/pets")
        'class-labelled images in the subfolders of /data/pets'
    """
    kind, path = _parse(spec)
    text = {
        "fashion-mnist": "Fashion-MNIST: 60,000 train / 10,000 test images, 28x28 grayscale, 10 classes",
        "mnist": "MNIST digits: 60,000 train / 10,000 test, 28x28 grayscale (offline: a 4,000 / 1,000 sample)",
        "digits": "scikit-learn's digits: 1,797 images, 8x8 grayscale, 10 classes",
        "imagefolder": f"class-labelled images in the subfolders of {path}",
        "images": f"unlabelled images in {path} and its subfolders",
        "npz": f"image arrays in the numpy archive {path}",
    }
    return text[kind]


def check_spec(spec: str) -> None:
    """Raise :class:`DataError` unless ``spec`` is well formed and any path it names exists,
    without reading an image (to fail at once, not after an hour of training).

    Example:
        >>> check_spec("images:~/no-such-folder")
        Traceback (most recent call last):
        labelless.errors.DataError: folder '/home/me/no-such-folder' does not exist: ...
    """
    kind, path = _parse(spec)
    if kind == "npz":
        check_input_file(path, "npz file", DataError)
    elif path is not None:
        check_folder(path)


def _check_options(split: str, size: int | None, channels: int | None, limit: int | None) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise DataError(f"image size must be a whole number >= 1, got {size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grayscale), 3 (RGB) or None (as stored), got {channels!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a whole number >= 1 (or None for all images), got {limit!r}")


_NAMED = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
          "mnist": "mnist", "digits": "digits"}
_PATH_KINDS = ("imagefolder", "images", "npz")


def absolute_spec(spec: str) -> str:
    """``spec`` with the path of a folder or file spec made absolute (``npz:x.npz`` ->
    ``npz:/here/x.npz``), so a later command run from another folder reads the same images."""
    kind, colon, rest = spec.strip().partition(":")
    if colon and kind.lower() in _PATH_KINDS and rest.strip():
        return f"{kind}:{Path(rest.strip()).expanduser().absolute()}"
    return spec


def _parse(spec: str) -> tuple[str, Path | None]:
    """``"npz:~/x.npz"`` -> ``("npz", Path("/home/me/x.npz"))``; ``"mnist"`` -> ``("mnist", None)``."""
    if not isinstance(spec, str):
        raise DataError(f"a data spec must be a string such as {SPEC_FORMS}, got {type(spec).__name__}")
    kind, colon, rest = spec.strip().partition(":")
    if not colon and kind.lower() in _NAMED:
        return _NAMED[kind.lower()], None
    if colon and kind.lower() in _PATH_KINDS:
        if not rest.strip():
            raise DataError(f"data spec {spec!r} names no path: write {kind}:PATH")
        return kind.lower(), Path(rest.strip()).expanduser()
    is_path = bool(spec.strip()) and Path(spec).expanduser().exists()
    hint = f" ({spec!r} is a path: prefix it with images:, imagefolder: or npz:)" if is_path else ""
    raise DataError(f"unknown data spec {spec!r}: use one of {SPEC_FORMS}{hint}")


def _subset(n: int, limit: int | None, seed: int, after: int = 0) -> Tensor | None:
    """Sorted indices of a seeded random subset of ``limit`` out of ``n``, drawn after the first
    ``after`` of the same seeded order (None: keep all)."""
    if after == 0 and (limit is None or limit >= n):
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[after:None if limit is None else after + limit].sort().values


_READERS: dict[str, Callable[[Any, str], Source]] = {
    "fashion-mnist": read_fashion,
    "mnist": read_mnist,
    "digits": read_digits,
    "imagefolder": read_imagefolder,
    "images": read_images,
    "npz": read_npz,
}
