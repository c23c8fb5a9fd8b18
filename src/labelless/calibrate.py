"""A plan applied as labelless ships it: quantized, then calibrated on unlabelled images.

``labelless run``, ``labelless quantize`` and the benchmarks make the model they ship in this one
way: k-means under the label-free importance, then, as asked, each layer's indices compensated
(:mod:`labelless.compensate`: the same codebooks and bytes, outputs moved least) and the BatchNorm
statistics corrected (:mod:`labelless.bncorrect`), both on the same unlabelled images. No label is
read.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .bncorrect import correct_batchnorm
from .compensate import compensate as compensate_indices
from .errors import LabellessError
from .quantize import quantize

__all__ = ["calibrated_model"]


def calibrated_model(
    teacher: nn.Module,
    plan,
    images: Dataset | None = None,
    preprocess: nn.Module | None = None,
    *,
    importance: dict[str, torch.Tensor] | None = None,
    compensate: bool = False,
    correct_bn: bool = False,
    n_images: int = 512,
    seed: int = 0,
    device: torch.device | None = None,
    inplace: bool = False,
) -> nn.Module:
    """``plan`` applied to ``teacher``, then compensated and BatchNorm-corrected on ``images`` as
    asked. ``teacher`` is left unchanged unless ``inplace`` and nothing is calibrated (then it is
    quantized itself, which saves a copy of a large model no longer needed).

    Example:
        >>> shipped = calibrated_model(teacher, plan, open_images("mnist", size=28).unlabeled(),
        ...                            Preprocess.for_spec(spec), compensate=True)
    """
    if (compensate or correct_bn) and (images is None or preprocess is None):
        raise LabellessError("compensation and BatchNorm correction measure on unlabelled images: give them "
                             "(and their preprocessing)")
    model = quantize(teacher, plan, importance=importance, inplace=inplace and not (compensate or correct_bn))
    options = dict(n_images=n_images, seed=seed, device=device)
    if compensate:
        compensate_indices(model, teacher, images, preprocess, **options)
    if correct_bn:
        correct_batchnorm(model, teacher, images, preprocess, **options)
    return model
