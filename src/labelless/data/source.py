"""What a reader of one kind of source hands back to :func:`~labelless.data.open_images`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor


@dataclass
class Source:
    """What a reader found: an array in memory, or a list of files; labels and class names if any."""

    where: str  # the folder or file the images came from, for logs
    images: Tensor | None = None  # (N, C, H, W) uint8
    files: list[Path] | None = None
    labels: Tensor | None = None  # (N,) int64
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)
