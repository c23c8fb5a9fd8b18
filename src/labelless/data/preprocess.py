"""From uint8 batches to model input: channels, size and normalisation, on the batch's device."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataError
from .arrays import LUMA


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
