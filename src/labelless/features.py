"""Feature distillation: the student's intermediate layer outputs matched to the teacher's.

A logit KL on images of another domain sees only the teacher's confident, skewed outputs;
a local loss on each layer's output depends on the inputs' second moments and carries far
more signal per image (AdaRound, BRECQ and kill-the-bits' layer-wise stage rely on it).
:class:`FeatureTaps` records the outputs of named modules during a forward pass, and
:func:`feature_loss` compares two recordings: the mean over layers of the squared error
normalised by the teacher output's mean square, so every layer counts alike whatever its
scale.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .layers import list_layers

__all__ = ["FeatureTaps", "feature_loss", "tap_names"]


def tap_names(model: nn.Module) -> list[str]:
    """The modules whose outputs are matched: every Conv/Linear layer but the last (whose
    output, the logits, the distillation loss already matches)."""
    return [layer.name for layer in list_layers(model)][:-1]


class FeatureTaps:
    """Forward hooks on ``model``'s modules ``names``; ``outputs`` holds the latest output of each.

    Example:
        >>> with FeatureTaps(student, tap_names(student)) as taps:
        ...     student(x)
        >>> [t.shape for t in taps.outputs.values()]
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2`` (both per batch)."""
    terms = []
    for name, target in teacher.items():
        target = target.detach().float()
        diff = student[name].float() - target
        terms.append(diff.pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()
