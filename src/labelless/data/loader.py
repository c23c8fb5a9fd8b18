"""Batches of a dataset, in an order fixed by a seed."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError


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
