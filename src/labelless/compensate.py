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
go in order of decreasing ``diag(H)`` ("act order"). A grouped convolution (a depthwise one
too) has one Hessian per group, over the inputs that group reads; all groups run at once.
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

__all__ = ["compensate", "gptq_indices", "solver", "assign_indices", "input_hessian", "compensable"]

log = logging.getLogger(__name__)

BLOCK = 128  # columns per lazy-update block
MAX_COLUMNS = 8192  # wider layers keep nearest-centroid indices: the Hessian work grows as columns cubed


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
    max_columns: int = MAX_COLUMNS,
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
    wide = [fqn for fqn, qt in targets if _columns(qt.module) > max_columns]
    if wide:
        log.info("compensate: %s read more than %d inputs per output and keep nearest-centroid indices",
                 ", ".join(wide), max_columns)
    targets = [(fqn, qt) for fqn, qt in targets if fqn not in wide]
    modes = student.training
    student.eval()
    try:
        for fqn, qt in progress(targets, desc="compensate", unit="layer"):
            hessian = input_hessian(student, qt.module, x, batch_size)
            reference = original[fqn].weight.detach().to(device, torch.float32)
            qt.indices.copy_(gptq_indices(reference, qt, hessian, damp).to(qt.indices.dtype))
    finally:
        student.train(modes)
    log.info("compensated %d layers on %d unlabelled images", len(targets), x.shape[0])
    return len(targets)


def gptq_indices(weight: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTQ over ``qt``'s codebook(s): the index of every value of ``weight`` (its shape).

    ``hessian``: ``(C, C)`` over the flattened input of every output channel, or ``(G, C, C)``
    for a convolution in ``G`` groups (group ``g``'s output channels read its own inputs).
    """
    return assign_indices(weight, qt.centroids, solver(hessian, damp))


def solver(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, upper)``: one layer's column order (decreasing ``diag(H)``) and the factor of its
    damped inverse Hessian, per group: computed once, used for every codebook of that layer."""
    hessian = hessian if hessian.dim() == 3 else hessian[None]
    order = torch.argsort(torch.diagonal(hessian, dim1=-2, dim2=-1), dim=-1, descending=True)  # (G, C)
    g = torch.arange(hessian.shape[0])[:, None, None]
    return order, _inverse_factor(hessian.float()[g, order[:, :, None], order[:, None, :]], damp)


def assign_indices(weight: torch.Tensor, centroids: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
    """The GPTQ index of every value of ``weight`` into ``centroids`` ((k,), or (codebooks, k)),
    with a layer's :func:`solver`."""
    order, upper = prepared
    groups, n_cols = upper.shape[0], upper.shape[-1]
    rows = weight.reshape(groups, -1, n_cols).float()  # (G, rows per group, C)
    table = _row_codebooks(centroids, weight.shape[0]).to(rows).reshape(groups, rows.shape[1], -1)
    spread = order[:, None, :].expand_as(rows)
    chosen = _assign(rows.gather(2, spread), table, upper)
    return torch.empty_like(chosen).scatter_(2, spread, chosen).view(weight.shape)


def _assign(w: torch.Tensor, table: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The column loop of GPTQ with lazy block updates, for every group at once.

    ``w`` (G, R, C) is consumed; ``table`` (G, R, k) holds each row's codebook; ``upper``
    (G, C, C) each group's inverse-Hessian factor. Returns the chosen indices, (G, R, C).
    """
    n_cols = w.shape[-1]
    indices = torch.empty(w.shape, dtype=torch.long)
    for start in range(0, n_cols, BLOCK):
        end = min(start + BLOCK, n_cols)
        block, errors = w[..., start:end], torch.empty(*w.shape[:2], end - start, dtype=w.dtype)
        for i in range(end - start):
            col = start + i
            column = block[..., i]  # (G, R)
            idx = (column[..., None] - table).abs().argmin(-1)
            error = (column - table.gather(-1, idx[..., None]).squeeze(-1)) / upper[:, col, col, None]
            block[..., i:] -= error[..., None] * upper[:, None, col, col:end]
            indices[..., col], errors[..., i] = idx, error
        w[..., end:] -= errors @ upper[:, start:end, end:]
    return indices


def _inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the damped inverse Hessian (``H^-1 = U^T U``, GPTQ's
    ``Hinv``), per group, from one Cholesky factorisation and one triangular inverse: with
    ``J`` the order reversal and ``J H J = L L^T``, ``U = J L^-1 J``."""
    h = hessian.clone()
    diagonal = torch.diagonal(h, dim1=-2, dim2=-1)  # a view
    diagonal[diagonal == 0] = 1.0  # inputs that are always zero: any centroid is as good
    diagonal += damp * diagonal.mean(-1, keepdim=True)
    lower = torch.linalg.cholesky(h.flip(-2, -1))
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1)


def _row_codebooks(centroids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(rows, k): the codebook each output channel reads."""
    centroids = centroids.detach().float().cpu()
    if centroids.dim() == 1:
        return centroids.expand(n_rows, -1)
    return centroids[group_of_channel(n_rows, centroids.shape[0])]


def compensable(module: nn.Module, max_columns: int = MAX_COLUMNS) -> bool:
    """Whether :func:`compensate` re-chooses this layer's indices (a Linear or Conv2d that reads
    at most ``max_columns`` inputs per output)."""
    return _supported(module) and _columns(module) <= max_columns


def _columns(module: nn.Module) -> int:
    """Inputs each output channel reads: the side of the layer's Hessian."""
    return module.weight[0].numel()


def _supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


class _Seen(Exception):
    """Raised by the hook once the layer's input is recorded: the rest of the pass is not needed."""


def input_hessian(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``2 X^T X / n`` of what ``layer`` reads (unfolded patches for a convolution), one per group
    of a grouped convolution: ``(G, C, C)``, float64 on the CPU."""
    found = {"sum": torch.zeros(()), "n": 0}

    def hook(module: nn.Module, args: tuple) -> None:
        rows = _patches(module, args[0].detach().float())  # (n, in_features)
        grouped = rows.reshape(rows.shape[0], getattr(module, "groups", 1), -1)  # (n, G, in_features / G)
        if grouped.shape[1] == 1:
            product = (rows.T @ rows)[None]
        else:
            product = torch.einsum("ngi,ngj->gij", grouped, grouped)
        found["sum"] = found["sum"] + product  # float32 on the device, over a handful of batches
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
    return 2.0 * found["sum"].double().cpu() / max(found["n"], 1)


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
