"""Label-free importance of every weight: the diagonal Fisher information of the model's own
predictions.

For a classifier with softmax output ``p(y | x; w)`` the Fisher information is
``F = E_x E_{y ~ p(.|x)} [g g^T]`` with ``g = d log p(y | x) / dw``. No label is read: ``y``
is drawn from the model's own softmax. ``F`` is also the Gauss-Newton matrix of the KL
divergence between the original model and a perturbed copy at the original, so
``KL(p_w || p_{w + d}) ~ 1/2 * sum_i F_ii d_i^2`` for a small change ``d`` of the weights:
weighting the k-means by ``F_ii`` minimises (the diagonal of) how far the quantized model's
outputs move, not how far its weights move.

Estimator: for a batch of B images draw one ``y_b`` per image and take ``G = d/dw sum_b log
p(y_b | x_b)``. Each image's gradient has zero mean under its own drawn label, so the cross
terms of ``G^2`` vanish in expectation and ``E[G^2] = sum_b E[g_b^2]``: the squared batch
gradient is an unbiased estimate of the per-image Fisher diagonal summed over the batch, at
the cost of one backward pass per batch instead of one per image (``docs/PEERS.md`` measures
the batch size against per-image gradients).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .errors import LabellessError
from .layers import list_layers
from .progress import progress

__all__ = ["fisher_importance", "save_importance", "load_importance", "DEFAULT_IMAGES"]

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 512  # unlabelled images the importance is averaged over


def fisher_importance(
    model: nn.Module,
    images: Dataset,
    preprocess: nn.Module,
    *,
    n_images: int = DEFAULT_IMAGES,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model``'s predictions for each Conv/Linear weight and bias,
    averaged over up to ``n_images`` unlabelled images: ``{"<module>.weight": scores}``
    (float32 on the CPU, the shape of the tensor). Labels, if the dataset has them, are
    never read. ``model`` is left as it was (mode, gradients, ``requires_grad``).

    Example:
        >>> importance = fisher_importance(teacher, open_images("mnist", size=28), Preprocess.for_spec(spec))
        >>> q = quantize(teacher, [{"layers": "*", "weights": 4}], importance=importance)
    """
    if n_images < 1 or batch_size < 1:
        raise LabellessError(f"importance needs n_images >= 1 and batch_size >= 1, got {n_images} and {batch_size}")
    device = device or next(model.parameters()).device
    params = _quantizable_parameters(model)
    if not params:
        raise LabellessError(f"{type(model).__name__} has no Conv/Linear layer to score")
    state = (model.training, {key: p.requires_grad for key, p in params.items()})
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        total, seen = _accumulate(model, params, images, preprocess, n_images, batch_size, seed, device)
    finally:
        model.train(state[0])
        for key, p in params.items():
            p.requires_grad_(state[1][key])
    log.info("importance: diagonal Fisher on %d unlabelled images (labels drawn from the model's softmax)", seen)
    return {key: (value / seen).float().cpu() for key, value in total.items()}


def _quantizable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight and bias of every quantizable layer, one entry per distinct tensor."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for layer in list_layers(model):
        for name in ("weight", "bias"):
            param = getattr(modules[layer.name], name, None)
            if isinstance(param, nn.Parameter) and id(param) not in seen:
                seen.add(id(param))
                found[f"{layer.name}.{name}" if layer.name else name] = param
    return found


def _accumulate(model, params, images, preprocess, n_images, batch_size, seed, device):
    """Sum over batches of the squared gradient of the drawn-label log-likelihood."""
    from .data import loader

    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(images), generator=generator)[:n_images].tolist()
    data = torch.utils.data.Subset(images, subset)
    total = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in params.items()}
    keys, tensors = list(params), list(params.values())
    seen = 0
    n_batches = -(-len(data) // batch_size)
    for batch in progress(loader(data, batch_size), desc="importance", total=n_batches, unit="batch"):
        x = preprocess((batch[0] if isinstance(batch, (list, tuple)) else batch).to(device))
        logits = model(x).float()  # (B, classes)
        drawn = torch.multinomial(F.softmax(logits.detach(), dim=1).cpu(), 1, generator=generator).view(-1)
        log_likelihood = -F.cross_entropy(logits, drawn.to(logits.device), reduction="sum")
        grads = torch.autograd.grad(log_likelihood, tensors, allow_unused=True)
        for key, grad in zip(keys, grads):
            if grad is not None:
                total[key] += grad.double() ** 2
        seen += x.shape[0]
    if not seen:
        raise LabellessError("the unlabelled set for importance is empty: give it some images")
    return total, seen


def save_importance(importance: dict[str, torch.Tensor], path) -> None:
    """Write importance scores as safetensors (atomically), for a later search to reuse."""
    import safetensors.torch

    from .io import atomic_path

    with atomic_path(path) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in importance.items()}, str(tmp))


def load_importance(path) -> dict[str, torch.Tensor] | None:
    """Scores written by :func:`save_importance`, or None when there is no such file."""
    from pathlib import Path

    import safetensors.torch

    if not Path(path).is_file():
        return None
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise LabellessError(f"{path}: unreadable importance file ({exc}): delete it and run the sweep again") from None
