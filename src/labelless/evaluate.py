"""Running a model over a dataset, and the metrics labelless reports.

Fidelity to the original model needs no labels: top-1 *agreement* (percent of images on
which the two models predict the same class) and the mean KL divergence between their
softmax outputs. *Accuracy* needs labels and is reported only when some are given.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .progress import progress

__all__ = ["predict", "predict_labeled", "accuracy", "agreement", "kl_divergence", "resolve_device", "autocast"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (mixed precision); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(dataset: Dataset, batch_size: int) -> Iterator:
    from .data import loader

    return iter(loader(dataset, batch_size))


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    preprocess: nn.Module,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits (N, classes) of ``model`` on an unlabelled dataset, in float32 on the CPU."""
    device = device or next(model.parameters()).device
    outputs = []
    for images in progress(_batches(dataset, batch_size), desc=desc, total=-(-len(dataset) // batch_size)):
        images = images[0] if isinstance(images, (list, tuple)) else images
        outputs.append(_forward(model, preprocess, images, device).float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def predict_labeled(
    model: nn.Module,
    dataset: Dataset,
    preprocess: nn.Module,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    desc: str = "evaluate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` on a labelled dataset."""
    device = device or next(model.parameters()).device
    outputs, labels = [], []
    for images, targets in progress(_batches(dataset, batch_size), desc=desc, total=-(-len(dataset) // batch_size)):
        outputs.append(_forward(model, preprocess, images, device).float().cpu())
        labels.append(targets)
    return torch.cat(outputs), torch.cat(labels)


def _forward(model: nn.Module, preprocess: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with autocast(device):
            return model(preprocess(images.to(device, non_blocking=True)))
    finally:
        model.train(was_training)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Percent of rows where the two sets of logits pick the same class."""
    return 100.0 * (student.argmax(1) == teacher.argmax(1)).float().mean().item()


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean KL(teacher || student) between softmax outputs."""
    return F.kl_div(
        F.log_softmax(student.float() / temperature, 1),
        F.log_softmax(teacher.float() / temperature, 1),
        log_target=True,
        reduction="batchmean",
    ).item()
