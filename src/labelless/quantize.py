"""Apply a plan: replace chosen weights and biases by a codebook plus one index per value.

A quantized parameter ``weight`` of a layer becomes two tensors on that layer:
``weight_centroids`` (a frozen float32 ``nn.Parameter`` of length k) and ``weight_indices``
(a buffer of the weight's shape, uint8 for k <= 256). A forward pre-hook rebuilds the plain
tensor ``layer.weight = weight_centroids[weight_indices]`` (cached until either changes),
so the forward pass is ordinary torch code and the tensor never has more than k values.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .errors import ModelError, PlanError
from .kmeans import cluster
from .layers import QUANTIZABLE_TYPES, list_layers
from .plan import LayerSetting, Plan, load_plan
from .progress import progress

__all__ = [
    "quantize", "dequantize", "quantized_tensors", "QuantizedTensor", "install", "decode", "unquantized_parameters"
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedTensor:
    """View of one quantized parameter ``module.<name>``."""

    module: nn.Module
    name: str  # "weight" or "bias"

    @property
    def centroids(self) -> nn.Parameter:  # (k,)
        return getattr(self.module, f"{self.name}_centroids")

    @property
    def indices(self) -> torch.Tensor:  # shape of the parameter, values in [0, k)
        return getattr(self.module, f"{self.name}_indices")

    @property
    def n_clusters(self) -> int:
        return self.centroids.numel()

    def dense(self) -> torch.Tensor:
        return decode(self.centroids.detach(), self.indices)


def quantize(
    model: nn.Module,
    plan: Plan | str | list | dict,
    *,
    example_input: torch.Tensor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose planned weights/biases are k-means quantized.

    Parameters the plan does not touch stay bit-identical; a parameter shared by several
    modules is quantized once and stays shared.

    Example:
        >>> q = quantize(model, [{"layers": "*", "weights": 16, "bias": 1}])
        >>> quantized_tensors(q)["features.0.weight"].n_clusters
        16
    """
    plan = load_plan(plan)
    target = model if inplace else copy.deepcopy(model)
    layers = list_layers(target, example_input)
    if not layers:
        raise PlanError(
            f"{type(model).__name__} has no quantizable layer; labelless quantizes "
            f"{', '.join(t.__name__ for t in QUANTIZABLE_TYPES)}"
        )
    settings = plan.resolve(layers, _other_modules(target))
    if not settings:
        raise PlanError("the plan quantizes nothing: its rules leave every layer at full precision (null); "
                        "give some layer a number of centroids, e.g. {layers: '*', weights: 16}")
    modules = dict(target.named_modules())
    jobs = _jobs(modules, settings)
    for fqn, name, n_clusters in progress(jobs, desc="quantize", unit="tensor"):
        _quantize_parameter(target, modules[fqn], fqn, name, n_clusters)
    target.labelless_plan = plan
    return target


def _other_modules(model: nn.Module) -> dict[str, str]:
    return {fqn: type(m).__name__ for fqn, m in model.named_modules() if not isinstance(m, QUANTIZABLE_TYPES)}


def _jobs(modules: dict[str, nn.Module], settings: dict[str, LayerSetting]) -> list[tuple[str, str, int]]:
    """(module name, parameter name, k), one per distinct parameter, larger tensors first."""
    seen: dict[int, tuple[str, int]] = {}
    jobs = []
    for fqn, setting in settings.items():
        for name in ("weight", "bias"):
            n_clusters = getattr(setting, name if name == "bias" else "weights")
            param = getattr(modules[fqn], name, None)
            if n_clusters is None or param is None:
                continue
            first = seen.setdefault(id(param), (f"{fqn}.{name}", n_clusters))
            if first[0] != f"{fqn}.{name}":
                if first[1] != n_clusters:
                    raise PlanError(
                        f"{fqn}.{name} is the same tensor as {first[0]} but the plan gives them "
                        f"{n_clusters} and {first[1]} centroids: give both the same"
                    )
                continue
            jobs.append((fqn, name, n_clusters))
    return sorted(jobs, key=lambda job: -getattr(modules[job[0]], job[1]).numel())


def _quantize_parameter(model: nn.Module, module: nn.Module, fqn: str, name: str, n_clusters: int) -> None:
    param = getattr(module, name)
    values = param.detach()
    key = f"{fqn}.{name}" if fqn else name
    _check_finite(values, key)
    if n_clusters > values.numel():
        log.warning("%s: %d centroids asked for but it has only %d values; using %d (each value kept exactly)",
                    key, n_clusters, values.numel(), values.numel())
        n_clusters = values.numel()
    flat = np.ascontiguousarray(values.reshape(-1).to("cpu", torch.float32).numpy())
    centroids, indices = cluster(flat, n_clusters, None, _index_dtype(n_clusters))
    centroids_t = nn.Parameter(torch.from_numpy(centroids).to(values.device), requires_grad=False)
    indices_t = torch.from_numpy(indices).view(values.shape).to(values.device)
    for owner, owner_name in _owners(model, param):
        install(owner, owner_name, centroids_t, indices_t)


def _check_finite(values: torch.Tensor, key: str) -> None:
    n_bad = int((~torch.isfinite(values)).sum())
    if n_bad:
        raise ModelError(f"{key} holds {n_bad} NaN or infinite value(s) of {values.numel()}: k-means needs finite "
                         "weights; fix the model (an earlier checkpoint, or retrain it) before quantizing")


def unquantized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that are not codebooks of quantized tensors: what retraining
    can train without ``tune_centroids`` (empty when every parameter is quantized)."""
    centroids = {id(qt.centroids) for qt in quantized_tensors(model).values()}
    return [param for param in model.parameters() if id(param) not in centroids]


def _owners(model: nn.Module, param: torch.Tensor) -> Iterable[tuple[nn.Module, str]]:
    for module in model.modules():
        for name, candidate in list(module._parameters.items()):
            if candidate is param:
                yield module, name


def _index_dtype(n_clusters: int) -> type:
    if n_clusters <= 256:
        return np.uint8
    return np.int16 if n_clusters <= 32768 else np.int32


def install(module: nn.Module, name: str, centroids: torch.Tensor, indices: torch.Tensor) -> None:
    """Make ``module.<name>`` a quantized tensor with these centroids and indices.

    Passing the same ``centroids``/``indices`` objects to several modules keeps them shared.
    """
    if name in module._parameters:
        del module._parameters[name]
    if isinstance(centroids, nn.Parameter):
        module.register_parameter(f"{name}_centroids", centroids)
    else:
        module.register_parameter(f"{name}_centroids", nn.Parameter(centroids, requires_grad=False))
    module.register_buffer(f"{name}_indices", indices)
    names = getattr(module, "labelless_quantized", ())
    if name not in names:
        module.labelless_quantized = tuple(names) + (name,)
    if not getattr(module, "_labelless_hooked", False):
        module.register_forward_pre_hook(_rebuild)
        module._labelless_hooked = True
    with torch.no_grad():
        _rebuild(module, ())


def decode(centroids: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``centroids[indices]`` for compact (uint8/int16/int32) indices."""
    flat = indices.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int32)
    dense = centroids.index_select(0, flat).view(indices.shape)
    if indices.dim() == 4 and not indices.is_contiguous() and indices.is_contiguous(memory_format=torch.channels_last):
        dense = dense.contiguous(memory_format=torch.channels_last)
    return dense


def _rebuild(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: refresh ``module.<name>`` from its centroids and indices."""
    for name in module.labelless_quantized:
        centroids = module._parameters[f"{name}_centroids"]
        indices = module._buffers[f"{name}_indices"]
        live = centroids.requires_grad and torch.is_grad_enabled()
        key = (centroids._version, centroids.data_ptr(), indices._version, indices.data_ptr(), centroids.device)
        if live or module.__dict__.get(f"_{name}_key") != key or name not in module.__dict__:
            module.__dict__[name] = decode(centroids, indices)
            module.__dict__[f"_{name}_key"] = None if live else key


def quantized_tensors(model: nn.Module) -> dict[str, QuantizedTensor]:
    """Every quantized parameter of ``model``, keyed ``"<module name>.<weight|bias>"``."""
    found = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name in getattr(module, "labelless_quantized", ()):
            found[f"{fqn}.{name}" if fqn else name] = QuantizedTensor(module, name)
    return found


def dequantize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with plain dense parameters in place of every quantized tensor."""
    dense = copy.deepcopy(model)
    shared: dict[tuple[int, int], nn.Parameter] = {}
    for module in dense.modules():
        for name in getattr(module, "labelless_quantized", ()):
            qt = QuantizedTensor(module, name)
            key = (id(qt.centroids), id(qt.indices))
            param = shared.setdefault(key, nn.Parameter(qt.dense().clone()))
            del module._parameters[f"{name}_centroids"], module._buffers[f"{name}_indices"]
            module.__dict__.pop(name, None)
            module.__dict__.pop(f"_{name}_key", None)
            module.register_parameter(name, param)
        if getattr(module, "_labelless_hooked", False):
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _rebuild]:
                del module._forward_pre_hooks[key]
            del module.labelless_quantized, module._labelless_hooked
    dense.__dict__.pop("labelless_plan", None)
    return dense
