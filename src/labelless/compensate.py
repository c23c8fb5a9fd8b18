"""Error compensation: choose each weight's centroid so the *layer's output* moves least.

Nearest-centroid rounding treats every weight on its own. But a layer computes ``W x``: the
error one rounded weight makes can be cancelled by the weights that read correlated inputs.
GPTQ (Frantar et al., 2023) does that column by column with the inverse Hessian of the
layer's squared output error, ``H = 2 X^T X`` over calibration inputs ``X``; here the grid is
each tensor's k-means codebook instead of a uniform one (as in GPTVQ). Only the indices
change: the codebooks, the plan and every byte of the file stay as they are, and no label is
read (the inputs come from unlabelled images).

Layers are compensated in forward order, each on the inputs it receives from the already
compensated layers before it (so later layers also absorb the earlier ones' errors); columns
go in order of decreasing ``diag(H)`` ("act order"). Grouped convolutions (depthwise ones)
keep their nearest-centroid indices.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .bncorrect import _sample
from .progress import progress
from .quantize import QuantizedTensor, group_of_channel, quantized_tensors

__all__ = ["compensate", "gptq_indices"]

log = logging.getLogger(__name__)

BLOCK = 128  # columns per lazy-update block


@torch.no_grad()
def compensate(
    student: nn.Module,
    teacher: nn.Module,
    images: Dataset,
    preprocess: nn.Module,
    *,
    n_images: int = 512,
    seed: int = 0,
    damp: float = 0.01,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> int:
    """Re-choose the indices of ``student``'s quantized Conv/Linear weights in place, against
    ``teacher``'s original weights (see the module docstring); returns how many were changed.

    Example:
        >>> q = quantize(teacher, [{"layers": "*", "weights": 8}])
        >>> compensate(q, teacher, open_images("fashion-mnist").unlabeled(), Preprocess.for_spec(spec))
        21
    """
    device = device or next(student.parameters()).device
    x = preprocess(_sample(images, n_images, seed).to(device))
    original = dict(teacher.named_modules())
    targets = [(key.rsplit(".", 1)[0], qt) for key, qt in quantized_tensors(student).items()
               if qt.name == "weight" and _supported(qt.module)]
    modes = student.training
    student.eval()
    try:
        for fqn, qt in progress(targets, desc="compensate", unit="layer"):
            hessian = _input_hessian(student, qt.module, x, batch_size)
            reference = original[fqn].weight.detach().to(device, torch.float32)
            qt.indices.copy_(gptq_indices(reference, qt, hessian, damp).to(qt.indices.dtype))
    finally:
        student.train(modes)
    log.info("compensated %d layers on %d unlabelled images", len(targets), x.shape[0])
    return len(targets)


def gptq_indices(weight: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTQ over ``qt``'s codebook(s): the index of every value of ``weight`` (its shape)."""
    rows = weight.reshape(weight.shape[0], -1).double()
    table = _row_codebooks(qt, rows.shape[0]).to(rows)
    order = torch.argsort(torch.diagonal(hessian), descending=True)
    upper = _inverse_factor(hessian[order][:, order].double(), damp)
    chosen = _assign(rows[:, order].clone(), table, upper)
    indices = torch.empty_like(chosen)
    indices[:, order] = chosen
    return indices.view(weight.shape)


def _assign(w: torch.Tensor, table: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The column loop of GPTQ with lazy block updates; ``w`` (rows, cols) is consumed."""
    n_cols = w.shape[1]
    indices = torch.empty(w.shape, dtype=torch.long)
    for start in range(0, n_cols, BLOCK):
        end = min(start + BLOCK, n_cols)
        block, errors = w[:, start:end], torch.empty(w.shape[0], end - start, dtype=w.dtype)
        for i in range(end - start):
            column = block[:, i]
            idx = (column[:, None] - table).abs().argmin(1)
            error = (column - table.gather(1, idx[:, None]).squeeze(1)) / upper[start + i, start + i]
            block[:, i:] -= error[:, None] * upper[start + i, start + i:end][None, :]
            indices[:, start + i], errors[:, i] = idx, error
        w[:, end:] -= errors @ upper[start:end, end:]
    return indices


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ's ``Hinv``)."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0  # inputs that are always zero: any centroid is as good
    h[dead, dead] = 1.0
    h += torch.eye(h.shape[0], dtype=h.dtype) * (damp * torch.diagonal(h).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _row_codebooks(qt: QuantizedTensor, n_rows: int) -> torch.Tensor:
    """(rows, k): the codebook each output channel reads."""
    centroids = qt.centroids.detach().float().cpu()
    if centroids.dim() == 1:
        return centroids.expand(n_rows, -1)
    return centroids[group_of_channel(n_rows, centroids.shape[0])]


def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class _Seen(Exception):
    """Raised by the hook once the layer's input is recorded: the rest of the pass is not needed."""


def _input_hessian(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``2 X^T X / n`` of what ``layer`` reads (unfolded patches for a convolution), float64 on the CPU."""
    found = {"sum": torch.zeros(()), "n": 0}

    def hook(module: nn.Module, args: tuple) -> None:
        rows = _patches(module, args[0].detach().float())
        found["sum"] = found["sum"] + (rows.T @ rows).double().cpu()
        found["n"] += rows.shape[0]
        raise _Seen

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in x.split(batch_size):
            try:
                model(batch)
            except _Seen:
                pass
    finally:
        handle.remove()
    return 2.0 * found["sum"] / max(found["n"], 1)


def _patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(n, in_features): the rows a Linear or Conv2d multiplies by its flattened weight."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        inputs = _padded(module, inputs)
        padding = 0
    else:
        padding = module.padding
    cols = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _padded(module: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` padded as the convolution pads them itself (string or non-zero padding)."""
    if isinstance(module.padding, str):  # "same" / "valid"
        if module.padding == "valid":
            return inputs
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(inputs, pads)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
