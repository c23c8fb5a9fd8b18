"""Whole arrays of images in memory: subsets, channel conversion, cropping and shrinking."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_CHUNK = 4096  # images per step when converting whole arrays (bounds the float copy)


def take(tensor: Tensor, index: np.ndarray) -> Tensor:
    """``tensor[index]`` for a CPU tensor via numpy: one copy, no thread pool (torch's uint8
    gather can take milliseconds per batch on a busy CPU)."""
    return torch.from_numpy(tensor.numpy()[index])


def _chunked(images: Tensor, step: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``step`` (uint8 -> uint8) to a big array a few thousand images at a time."""
    return torch.cat([step(part) for part in images.split(_CHUNK)]) if len(images) else images


def say_conversion(spec: str, n_converted: int, channels: int) -> None:
    """One log line when images are converted to the channels the model takes."""
    if n_converted:
        how = "grayscale (luminance)" if channels == 1 else "RGB (the gray channel repeated)"
        log.info("%s: %d image(s) converted to %s, the %d channel(s) the model takes", spec, n_converted, how, channels)


def array_channels(images: Tensor, channels: int | None, spec: str = "images") -> Tensor:
    """(N, C, H, W) uint8 -> (N, channels, H, W): 1 -> 3 repeats, 3 -> 1 is luminance."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    say_conversion(spec, images.shape[0], channels)
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    return _chunked(images, lambda part: (part.float() * luma).sum(1, keepdim=True).round().to(torch.uint8))


def fit_array(images: Tensor, size: int | None) -> Tensor:
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
