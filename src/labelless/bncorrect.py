"""BatchNorm statistics correction: undo the shift quantization causes, without labels or training.

Quantizing a layer's weights moves the mean and variance of what reaches the BatchNorm after
it; the BatchNorm keeps normalising with the original statistics, so every channel comes out
off-centre and mis-scaled, and the errors compound downstream. The correction measures, on
the same unlabelled images, what each BatchNorm layer receives in the original model and in
the quantized one, and moves the quantized model's running statistics by the difference::

    mean_q <- running_mean + (E_q[y] - E_o[y])        var_q <- running_var * Var_q[y] / Var_o[y]

Only the *difference* between the two models is taken from the images, so images of another
domain still correct toward the original training statistics (re-estimating the statistics
from such images, AdaBN, would move them toward the wrong domain). The layers are corrected
in forward order during one pass, so each sees its inputs as the corrected layers before it
make them. Nothing else changes: codebooks, indices and the file size stay as they are.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import LabellessError

__all__ = ["correct_batchnorm"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def correct_batchnorm(
    student: nn.Module,
    teacher: nn.Module,
    images: Dataset,
    preprocess: nn.Module,
    *,
    n_images: int = 512,
    seed: int = 0,
    device: torch.device | None = None,
) -> int:
    """Correct ``student``'s BatchNorm running statistics in place (see the module docstring);
    returns how many layers were corrected. ``teacher`` is the original model, unchanged.

    Example:
        >>> q = quantize(teacher, [{"layers": "*", "weights": 8}])
        >>> correct_batchnorm(q, teacher, open_images("fashion-mnist").unlabeled(), Preprocess.for_spec(spec))
        20
    """
    device = device or next(student.parameters()).device
    x = preprocess(_sample(images, n_images, seed).to(device))  # (N, C, H, W)
    names = [name for name, m in teacher.named_modules() if isinstance(m, _BN) and m.running_mean is not None]
    if not names:
        return 0
    reference = _input_moments(teacher.eval(), names, x)
    modes = student.training
    student.eval()
    corrector = _Corrector(dict(student.named_modules()), names, reference)
    try:
        student(x)
    finally:
        corrector.close()
        student.train(modes)
    log.info("corrected the statistics of %d BatchNorm layers on %d unlabelled images", len(names), x.shape[0])
    return len(names)


def _sample(images: Dataset, n_images: int, seed: int) -> torch.Tensor:
    if n_images < 1 or len(images) == 0:
        raise LabellessError("the BatchNorm correction needs at least one unlabelled image")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    items = [images[i] for i in chosen]
    return torch.stack([item[0] if isinstance(item, (list, tuple)) else item for item in items])


def _moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance over every axis but dim 1."""
    dims = [d for d in range(y.dim()) if d != 1]
    y = y.float()
    return y.mean(dims), y.var(dims, unbiased=False)


def _input_moments(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = dict(model.named_modules())
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input goes on unchanged
            if name not in found:
                found[name] = _moments(args[0])

        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


class _Corrector:
    """Pre-hooks that reset each BatchNorm's statistics from its input before it runs."""

    def __init__(self, modules: dict[str, nn.Module], names: list[str], reference: dict):
        self.handles = []
        for name in names:
            if name in reference and name in modules:
                self.handles.append(modules[name].register_forward_pre_hook(self._hook(reference[name])))

    @staticmethod
    def _hook(reference: tuple[torch.Tensor, torch.Tensor]):
        done: list[bool] = []

        def correct(module: nn.Module, args: tuple) -> None:
            if done:  # a module called twice in one pass is corrected once
                return
            done.append(True)
            mean, var = _moments(args[0])
            ref_mean, ref_var = reference
            module.running_mean += (mean - ref_mean).to(module.running_mean.dtype)
            ratio = (var + module.eps) / (ref_var + module.eps)
            module.running_var *= ratio.to(module.running_var.dtype)

        return correct

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
