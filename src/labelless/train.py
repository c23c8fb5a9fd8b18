"""Training an original model with labels, for demos and experiments.

This is not part of the compression path (which needs no labels); it exists so the demo
and the benchmarks have a teacher when no pretrained weights can be downloaded.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import option
from .data import batch_source
from .errors import LabellessError
from .evaluate import autocast
from .progress import progress

__all__ = ["TrainConfig", "train_classifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(2, 'passes over the training images')
    lr: float = option(2e-3, 'peak of a one-cycle schedule (AdamW)')
    weight_decay: float = option(5e-4, 'AdamW weight decay')
    batch_size: int = option(128, 'images per batch')
    augment: bool = option(True, 'random 4-px shifts (pad and crop)')
    seed: int = option(0, 'seed of initialisation and shuffling')
    amp: bool = option(True, 'bf16 mixed precision on CUDA (no-op on CPU)')

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise LabellessError("train needs epochs >= 1, batch size >= 1 and a learning rate > 0")


def train_classifier(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    preprocess: nn.Module,
    *,
    config: TrainConfig = TrainConfig(),
    device: torch.device | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on a labelled dataset; returns loss, seconds and images/s.

    Example:
        >>> stats = train_classifier(model, open_images("fashion-mnist", labeled=True), Preprocess.for_spec(spec))
    """
    device = device or next(model.parameters()).device
    model.to(device).train()
    images, labels = _tensors(dataset)
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * (len(labels) // min(config.batch_size, len(labels)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    model.to(memory_format=torch.channels_last)  # with the fused step, 3.2 -> 3.9 steps/s on the demo (docs/DEMO.md)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: one_cycle(step, steps))
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    for batch in progress(_batches(len(labels), config, generator), desc="train", total=steps, unit="step"):
        x = preprocess(images[batch].to(device))
        if config.augment:
            x = _shift(x, generator)
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        with autocast(device, config.amp):
            loss = F.cross_entropy(model(x).float(), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum, seen = loss_sum + loss.item() * len(batch), seen + len(batch)
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format).eval()  # saved and quantized in the usual layout
    return {"loss": loss_sum / max(seen, 1), "seconds": seconds, "images_per_second": seen / seconds}


def one_cycle(step: int, total: int, warmup: float = 0.25, floor: float = 0.04) -> float:
    """Learning-rate factor: linear warm-up from ``floor`` to 1, then cosine down to ~0.

    Defined for any number of steps, one included (torch's OneCycleLR divides by zero when
    the warm-up is a single step).
    """
    rise = max(1, round(warmup * total))
    if step < rise:
        return floor + (1 - floor) * step / rise
    fall = max(1, total - rise)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - rise) / fall)))


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of ``dataset``, held in memory for the epochs."""
    if len(dataset) == 0:
        raise LabellessError("the training set is empty")
    return batch_source(dataset, labeled=True).batch(torch.arange(len(dataset)))


def _batches(n: int, config: TrainConfig, generator: torch.Generator):
    """Shuffled full batches, epoch after epoch (a set smaller than a batch is one batch)."""
    size = min(config.batch_size, n)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        yield from order[: n - n % size].split(size)


def _shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels, the same for the whole batch."""
    h, w = x.shape[-2:]
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return F.pad(x, (pad, pad, pad, pad), mode="replicate")[..., dy : dy + h, dx : dx + w]
