"""The quantizable layers of a model, numbered 1, 2, ... in forward order.

Plans name layers by that number (``"14-15"``), by dotted module name or by regex;
``labelless layers`` prints the numbering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerInfo", "QUANTIZABLE_TYPES", "list_layers"]

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: its 1-based position in forward order and what it holds."""

    index: int
    name: str  # dotted module name (fqn), e.g. "features.0"
    type: str  # class name, e.g. "Conv2d"
    weight_shape: tuple[int, ...]
    n_weights: int
    n_bias: int  # 0 when the layer has no bias

    @property
    def n_params(self) -> int:
        return self.n_weights + self.n_bias

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "type": self.type,
            "shape": list(self.weight_shape),
            "n_params": self.n_params,
        }


def list_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[LayerInfo]:
    """Quantizable layers in the order the forward pass first calls them.

    Without ``example_input`` a model built by :func:`labelless.build_model` is traced on
    the meta device (no memory, no compute); any other model is numbered in registration
    order, which is forward order for the usual sequential and residual networks. Layers
    the forward pass never calls come last, in registration order.
    """
    modules = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)]
    order = _forward_order(model, example_input, [fqn for fqn, _ in modules])
    rank = {fqn: i for i, fqn in enumerate(order)}
    modules.sort(key=lambda item: rank.get(item[0], len(rank)))
    return [_info(i + 1, fqn, m) for i, (fqn, m) in enumerate(modules)]


def _info(index: int, fqn: str, module: nn.Module) -> LayerInfo:
    weight = _tensor(module, "weight")
    bias = _tensor(module, "bias")
    return LayerInfo(
        index=index,
        name=fqn,
        type=type(module).__name__,
        weight_shape=tuple(weight.shape),
        n_weights=weight.numel(),
        n_bias=0 if bias is None else bias.numel(),
    )


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    # A quantized layer holds its tensor as centroids + indices; its shape is the indices'.
    indices = getattr(module, f"{name}_indices", None)
    return indices if indices is not None else getattr(module, name, None)


def _forward_order(model: nn.Module, example_input: torch.Tensor | None, names: list[str]) -> list[str]:
    spec = getattr(model, "labelless_spec", None)
    if example_input is None and spec is None:
        return names
    if example_input is not None:
        return _trace(model, example_input)
    from .models import build_model

    try:  # on the meta device: no memory, no compute
        return _trace(build_model(spec, device="meta"), spec.example_input(device="meta"))
    except Exception:  # some constructors (regnet) compute on tensors: trace a real copy
        return _trace(build_model(spec), spec.example_input())


def _trace(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, fqn=fqn: order.append(fqn) if fqn not in order else None)
        for fqn, module in model.named_modules()
        if isinstance(module, QUANTIZABLE_TYPES)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return order
