"""The image set: uint8 ``(C, H, W)`` images of one size, in memory or decoded from files, with labels or a label-free view."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .arrays import take


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
                 decoder: Callable[[Path], Tensor] | None = None, image_shape: tuple[int, int, int] | None = None):
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
        images = take(self.images, index).unbind(0)
        return list(zip(images, take(self._labels, index).unbind(0))) if self.labeled else list(images)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 images ``(B, C, H, W)`` at ``indices``, with their labels when opened ``labeled``
        (else None): the form retraining, refinement and the search read images in."""
        if self.images is None:
            items = [self[int(i)] for i in indices]
            images = torch.stack([item[0] if self.labeled else item for item in items])
            return images, torch.stack([item[1] for item in items]) if self.labeled else None
        index = np.asarray(indices, dtype=np.int64)
        return take(self.images, index), take(self._labels, index) if self.labeled else None

    def labels_at(self, indices: Tensor) -> Tensor:
        """The labels at ``indices`` alone (no image decoded)."""
        self._refuse_labels("labels")
        if not self.labeled:
            raise DataError(f"{self.spec} was opened without labels: open it with labeled=True")
        return take(self._labels, np.asarray(indices, dtype=np.int64))

    @classmethod
    def of_images(cls, images: Tensor, spec: str = "images") -> "ImageSet":
        """A label-free set of uint8 ``(N, C, H, W)`` images held in memory."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{spec}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        return cls(spec, images.contiguous()).unlabeled()

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


class DatasetImages:
    """Any map-style dataset of uint8 images, or of ``(image, label)`` pairs, read in batches
    like an :class:`ImageSet` (a torchvision dataset with a uint8 transform, a user's own)."""

    def __init__(self, dataset: Dataset, labeled: bool):
        self.dataset, self.labeled = dataset, labeled

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        items = [self.dataset[int(i)] for i in indices]
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
        return images, torch.tensor([int(item[1]) for item in items]) if self.labeled else None

    def labels_at(self, indices: Tensor) -> Tensor:
        return torch.tensor([int(self.dataset[int(i)][1]) for i in indices])


def batch_source(dataset: Dataset, labeled: bool) -> ImageSet | DatasetImages:
    """``dataset`` as something to read batches from: an :class:`ImageSet` as itself (its
    label-free view unless ``labeled``, so that label-free work provably reads no label), any
    other dataset through :class:`DatasetImages`."""
    if len(dataset) == 0:
        raise DataError("the data is empty: give it some images")
    if not isinstance(dataset, ImageSet):
        return DatasetImages(dataset, labeled)
    if not labeled:
        return dataset.unlabeled()
    if not dataset.labeled:
        raise DataError(f"{dataset.spec} has no labels here: open it with labeled=True for labelled training")
    return dataset
