"""Folders of image files (``images:PATH``, ``imagefolder:PATH``): headers read once, images decoded lazily."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..progress import progress
from .arrays import say_conversion
from .imageset import ImageSet
from .source import Source

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Decoder:
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


def check_folder(path: Path) -> Path:
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


def read_images(path: Path, split: str) -> Source:
    root = _split_folder(check_folder(path), split)
    files = _image_files(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}: point images: at a "
                        f"folder of image files")
    return Source(where=str(root), files=files)


def read_imagefolder(path: Path, split: str) -> Source:
    root = _split_folder(check_folder(path), split)
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
    return Source(where=str(root), files=files, labels=torch.tensor(labels, dtype=torch.long), classes=classes)


def folder_set(spec: str, files: list[Path], labels: Tensor | None, classes: list[str] | None, labeled: bool,
                size: int | None, channels: int | None) -> ImageSet:
    """Read every header once (size, mode; fails early on undecodable files), then decode lazily."""
    headers = [_header(p) for p in progress(files, desc="reading image headers", total=len(files), unit="img")]
    if channels is None:
        channels = 1 if all(mode in _GRAY_MODES for _, mode in headers) else 3
    say_conversion(spec, sum((mode in _GRAY_MODES) != (channels == 1) for _, mode in headers), channels)
    if size is None:
        odd = next((i for i, (dims, _) in enumerate(headers) if dims != headers[0][0]), None)
        if odd is not None:
            (w0, h0), (w1, h1) = headers[0][0], headers[odd][0]
            raise DataError(f"images in {spec} differ in size ({files[0]} is {w0}x{h0}, {files[odd]} is {w1}x{h1}): "
                            f"give a size to resize them to")
    width, height = headers[0][0]
    shape = (channels, size or height, size or width)
    return ImageSet(spec, None, labels, classes, labeled=labeled, files=files, decoder=Decoder(channels, size),
                    image_shape=shape)


def readable(spec: str, files: list[Path], labels: Tensor | None) -> tuple[list[Path], Tensor | None]:
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
