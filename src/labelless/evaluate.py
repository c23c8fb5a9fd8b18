"""Running a model over a dataset, and the metrics labelless reports.

Fidelity to the original model needs no labels: top-1 *agreement* (percent of images on
which the two models predict the same class) and the mean KL divergence between their
softmax outputs. *Accuracy* needs labels and is reported only when some are given.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .errors import LabellessError
from .progress import progress

log = logging.getLogger(__name__)

__all__ = ["predict", "Predictions", "warn_if_collapsed", "accuracy", "agreement", "kl_divergence", "kl_per_image", "resolve_device", "autocast"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(name: str | None) -> None:
    """A clear error for a device torch does not know, or one this machine does not have."""
    if name in (None, "auto"):
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise LabellessError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LabellessError(f"device {name!r}: this machine has no usable CUDA GPU; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LabellessError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"numbered from 0; choose one of them")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (mixed precision); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(dataset: Dataset, batch_size: int) -> Iterator:
    from .data import loader

    return iter(loader(dataset, batch_size))


class Predictions(NamedTuple):
    logits: torch.Tensor  # (N, classes), float32 on the CPU
    labels: torch.Tensor | None  # (N,) when the dataset yields (image, label) pairs, else None


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    preprocess: nn.Module,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    desc: str = "predict",
) -> Predictions:
    """``model``'s logits on ``dataset`` and, when it is labelled, its labels in the same order.

    Example:
        >>> logits, labels = predict(model, open_images("fashion-mnist", split="test", labeled=True), preprocess)
        >>> accuracy(logits, labels)
    """
    device = device or next(model.parameters()).device
    outputs, labels = [], []
    for batch in progress(_batches(dataset, batch_size), desc=desc, total=-(-len(dataset) // batch_size)):
        images, targets = batch if isinstance(batch, (list, tuple)) else (batch, None)
        outputs.append(_forward(model, preprocess, images, device).float().cpu())
        if targets is not None:
            labels.append(targets)
    return Predictions(torch.cat(outputs), torch.cat(labels) if labels else None)


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


def balanced_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Top-1 agreement averaged over the classes the teacher predicts, each class weighing the
    same however many images the teacher puts in it: where the teacher calls most images one
    class, plain agreement is mostly that class, this is not."""
    predicted = teacher.argmax(1)
    hits = (student.argmax(1) == predicted).float()
    counts = torch.bincount(predicted, minlength=teacher.shape[1]).float()
    per_class = torch.zeros_like(counts).index_add_(0, predicted, hits)
    present = counts > 0
    return 100.0 * (per_class[present] / counts[present]).mean().item()


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean KL(teacher || student) between softmax outputs."""
    return F.kl_div(
        F.log_softmax(student.float() / temperature, 1),
        F.log_softmax(teacher.float() / temperature, 1),
        log_target=True,
        reduction="batchmean",
    ).item()


def fidelity(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """How close ``student``'s logits are to ``teacher``'s, in the label-free measures a sweep
    records and a search can budget: agreement, class-balanced agreement (percent), mean KL."""
    return {"agreement": agreement(student, teacher), "balanced": balanced_agreement(student, teacher),
            "kl": kl_divergence(teacher, student)}


def kl_per_image(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(N,) KL(teacher || student) of each row's softmax outputs (their mean is :func:`kl_divergence`)."""
    return F.kl_div(F.log_softmax(student.float(), 1), F.log_softmax(teacher.float(), 1), log_target=True,
                    reduction="none").sum(1)


COLLAPSED_SHARE = 0.5  # one predicted class above this share of the images: top-1 agreement says little


def warn_if_collapsed(logits: torch.Tensor, what: str = "the unlabelled images") -> float:
    """Log one warning when the model's predictions on ``what`` collapse onto one class (more
    than half the images): agreement with it there says little about accuracy. Returns the
    largest class's share."""
    if logits.numel() == 0:
        return 0.0
    counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    share = counts.max().item() / logits.shape[0]
    if share > COLLAPSED_SHARE:
        log.warning("the original model calls %.0f%% of %s class %d (%d of %d classes used): top-1 agreement on "
                    "them says little about accuracy; prefer images of the model's own domain, or a search "
                    "by class-balanced agreement (search.metric: balanced, --metric balanced)",
                    100 * share, what, int(counts.argmax()), int((counts > 0).sum()), logits.shape[1])
    return share
