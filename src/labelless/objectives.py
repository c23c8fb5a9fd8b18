"""What retraining minimises, and how it judges the held-out images.

One retraining loop (:mod:`labelless.retrain`) takes one of these:

* :class:`Distillation` (label-free, the product): match a teacher's outputs on unlabelled
  images, with KL or MSE on the logits, CutMix, class balancing by the teacher's predictions and,
  on request, the teacher's intermediate outputs (:mod:`labelless.features`) and BatchNorm-refined
  images (:mod:`labelless.refine`). No label is read anywhere on this path. Held-out figures:
  agreement with the teacher, then KL (per image, see :mod:`labelless.selection`).
* :class:`CrossEntropy` (the conventional baseline): cross-entropy on labels. Held-out figure:
  accuracy, then cross-entropy.

An objective is bound to one run (:meth:`Objective.begin`) and released at its end
(:meth:`Objective.end`); its options come from the run's :class:`~labelless.retrain.RetrainConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import Choice
from .evaluate import accuracy, agreement, autocast, kl_divergence, kl_per_image, warn_if_collapsed
from .features import FeatureTaps, feature_loss, tap_names
from .progress import progress
from .refine import refine_images
from .selection import Evidence

if TYPE_CHECKING:  # pragma: no cover
    from .retrain import RetrainConfig, _Trainer

__all__ = ["Objective", "Distillation", "CrossEntropy", "Loss"]


class Loss(Choice):
    """Distillation's loss on the logits: KL of the temperature-softened softmaxes, or MSE."""

    KL = "kl"
    MSE = "mse"


class Objective:
    """The interface the retraining loop calls; see :class:`Distillation` and :class:`CrossEntropy`."""

    kind: str = "objective"  # names the checkpoint file and enters its identity
    needs_labels: bool = False

    @property
    def teacher(self) -> nn.Module | None:
        return None

    def prepare(self, data: torch.utils.data.Dataset, preprocess: nn.Module, config: RetrainConfig,
                device: torch.device) -> torch.utils.data.Dataset:
        """The images the run trains on (by default ``data`` itself)."""
        return data

    def begin(self, trainer: _Trainer) -> torch.Tensor | None:
        """Bind to a run; return per-image sampling weights of the training split, or None."""
        return None

    def reference(self, trainer: _Trainer, indices: torch.Tensor) -> torch.Tensor:
        """What the student's held-out outputs are scored against."""
        raise NotImplementedError

    def mixes(self, config: RetrainConfig) -> float:
        """The probability that a batch is CutMix-ed (0: never, and no random draw is spent)."""
        return 0.0

    def loss(self, trainer: _Trainer, output: torch.Tensor, x: torch.Tensor, batch_idx: torch.Tensor,
             labels: torch.Tensor | None, mixed: bool) -> torch.Tensor:
        raise NotImplementedError

    def score(self, output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def evidence(self, output: torch.Tensor, reference: torch.Tensor) -> Evidence:
        """Per-image held-out hits and losses, for :func:`labelless.selection.significantly_better`."""
        raise NotImplementedError

    def end(self) -> None:
        """Release what :meth:`begin` took (hooks)."""


class Distillation(Objective):
    """Label-free: the student's outputs matched to ``teacher``'s on the same images."""

    kind = "labelfree"

    def __init__(self, teacher: nn.Module):
        self._teacher = teacher
        self.targets: torch.Tensor | None = None  # the teacher's logits on every image, computed once
        self.taps: tuple[FeatureTaps, FeatureTaps] | None = None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def prepare(self, data, preprocess, config, device):
        if not config.refine_steps:
            return data
        return refine_images(self._teacher, data, preprocess, config.refine_steps, device=device)

    def begin(self, trainer: _Trainer) -> torch.Tensor | None:
        self._teacher = trainer.place(self._teacher).eval()
        self.targets = self._all_logits(trainer)
        warn_if_collapsed(self.targets, "the retraining images")
        if trainer.config.features:
            names = tap_names(trainer.student)
            self.taps = (FeatureTaps(trainer.student, names), FeatureTaps(self._teacher, names))
        if not trainer.config.balance:
            return None
        return _balance_weights(self.targets[trainer.train_idx])

    def reference(self, trainer: _Trainer, indices: torch.Tensor) -> torch.Tensor:
        return self.targets[indices]

    def mixes(self, config: RetrainConfig) -> float:
        return config.cutmix

    def loss(self, trainer, output, x, batch_idx, labels, mixed):
        fresh = mixed or self.taps is not None  # the teacher runs on this very batch
        target = self._logits(trainer, x) if fresh else self.targets[batch_idx].to(trainer.device)
        loss = _distillation_loss(output, target, trainer.config)
        if self.taps is not None:
            loss = loss + trainer.config.features * feature_loss(self.taps[0].outputs, self.taps[1].outputs)
        return loss

    def score(self, output, reference):
        return {"agreement": agreement(output, reference), "kl": kl_divergence(reference, output)}

    def evidence(self, output, reference):
        return Evidence(output.argmax(1) == reference.argmax(1), kl_per_image(reference, output))

    def end(self) -> None:
        for taps in self.taps or ():
            taps.close()
        self.taps = None

    @torch.no_grad()
    def _logits(self, trainer: _Trainer, x: torch.Tensor) -> torch.Tensor:
        with autocast(trainer.device, trainer.config.amp):
            return self._teacher(x).float()

    @torch.no_grad()
    def _all_logits(self, trainer: _Trainer) -> torch.Tensor:
        """The teacher's logits on every image (for balancing and caching); under torchrun each
        rank computes its block of the images and the blocks are gathered."""
        n = len(trainer.source)
        mine = torch.arange(n)[distributed.block(n)]
        chunks = [self._logits(trainer, trainer.input(trainer.source.batch(b)[0])).cpu()
                  for b in progress(mine.split(256), desc="teacher outputs")]
        return distributed.gather_blocks(torch.cat(chunks) if chunks else torch.empty(0))


class CrossEntropy(Objective):
    """The conventional baseline: cross-entropy on the dataset's labels."""

    kind = "labeled"
    needs_labels = True

    def reference(self, trainer: _Trainer, indices: torch.Tensor) -> torch.Tensor:
        return trainer.source.labels_at(indices)

    def loss(self, trainer, output, x, batch_idx, labels, mixed):
        return F.cross_entropy(output, labels.to(trainer.device))

    def score(self, output, reference):
        return {"accuracy": accuracy(output, reference)}

    def evidence(self, output, reference):
        return Evidence(output.argmax(1) == reference, F.cross_entropy(output.float(), reference, reduction="none"))


def as_objective(target: Any) -> Objective:
    """An :class:`Objective` as given, or a teacher module made into a :class:`Distillation`."""
    if isinstance(target, Objective):
        return target
    if isinstance(target, nn.Module):
        return Distillation(target)
    raise TypeError(f"retrain needs a teacher nn.Module or an Objective, got {type(target).__name__}")


def _balance_weights(logits: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weights that balance the teacher's predicted classes."""
    predicted = logits.argmax(1)
    counts = torch.bincount(predicted, minlength=logits.shape[1]).float()
    return 1.0 / counts[predicted]


def _distillation_loss(student: torch.Tensor, teacher: torch.Tensor, config: RetrainConfig) -> torch.Tensor:
    if config.loss == Loss.MSE:
        return F.mse_loss(student, teacher)
    t = config.temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t
