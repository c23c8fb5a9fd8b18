"""Apply a plan: replace chosen weights and biases by a codebook plus one index per value.

A quantized parameter ``weight`` of a layer becomes two tensors on that layer:
``weight_centroids`` (a frozen float32 ``nn.Parameter``: ``(k,)`` for one codebook, or
``(G, k)`` for one codebook per group of output channels) and ``weight_indices`` (a buffer
of the weight's shape, uint8 for k <= 256). A forward pre-hook rebuilds the plain tensor
``layer.weight = weight_centroids[weight_indices]`` (cached until either changes), so the
forward pass is ordinary torch code and each codebook's rows hold at most k values.

With per-channel codebooks the ``C`` output channels (dim 0) are cut into ``G`` contiguous
groups of near-equal size: channel ``c`` uses codebook ``c * G // C``.

Given ``importance`` (one non-negative score per value, e.g. :func:`labelless.importance.
fisher_importance`), the k-means minimises the importance-weighted squared error instead of
the plain one.
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
from .plan import LayerSetting, Plan, TensorChoice, load_plan
from .progress import progress

__all__ = [
    "quantize", "dequantize", "quantized_tensors", "QuantizedTensor", "install", "decode", "unquantized_parameters",
    "cluster_tensor", "n_groups", "group_of_channel",
]

log = logging.getLogger(__name__)

IMPORTANCE_FLOOR = 1e-3  # every value keeps this share of the mean importance, so none is ignored


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
        return self.centroids.shape[-1]

    @property
    def n_codebooks(self) -> int:
        return 1 if self.centroids.dim() == 1 else self.centroids.shape[0]

    def dense(self) -> torch.Tensor:
        return decode(self.centroids.detach(), self.indices)


def quantize(
    model: nn.Module,
    plan: Plan | str | list | dict,
    *,
    importance: dict[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose planned weights/biases are k-means quantized.

    Parameters the plan does not touch stay bit-identical; a parameter shared by several
    modules is quantized once and stays shared. ``importance`` maps ``"<module>.weight"``
    (or ``.bias``) to one non-negative score per value (see
    :func:`labelless.importance.fisher_importance`); those tensors are clustered under the
    importance-weighted squared error, unless their plan rule says ``importance: false``.

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
    for fqn, name, choice, weighted in progress(jobs, desc="quantize", unit="tensor"):
        key = f"{fqn}.{name}" if fqn else name
        scores = _importance_of(importance, key, getattr(modules[fqn], name)) if weighted else None
        _quantize_parameter(target, modules[fqn], key, name, choice, scores)
    target.labelless_plan = plan
    return target


def _importance_of(importance: dict[str, torch.Tensor] | None, key: str, param: torch.Tensor) -> torch.Tensor | None:
    if importance is None:
        return None
    scores = importance.get(key)
    if scores is None:
        log.warning("%s: no importance given for it; clustering by plain squared error", key)
        return None
    if tuple(scores.shape) != tuple(param.shape):
        raise PlanError(f"importance for {key} has shape {tuple(scores.shape)} but the tensor is "
                        f"{tuple(param.shape)}: compute it on this model")
    return scores


def _other_modules(model: nn.Module) -> dict[str, str]:
    return {fqn: type(m).__name__ for fqn, m in model.named_modules() if not isinstance(m, QUANTIZABLE_TYPES)}


def _jobs(modules: dict[str, nn.Module], settings: dict[str, LayerSetting]) -> list[tuple[str, str, TensorChoice, bool]]:
    """(module name, parameter name, choice, importance-weighted), one per distinct parameter,
    larger tensors first."""
    seen: dict[int, tuple[str, tuple]] = {}
    jobs = []
    for fqn, setting in settings.items():
        for name in ("weight", "bias"):
            choice = _choice(setting, name)
            param = getattr(modules[fqn], name, None)
            if choice is None or param is None:
                continue
            job = (choice, setting.importance)
            first = seen.setdefault(id(param), (f"{fqn}.{name}", job))
            if first[0] != f"{fqn}.{name}":
                if first[1] != job:
                    raise PlanError(
                        f"{fqn}.{name} is the same tensor as {first[0]} but the plan quantizes them "
                        f"differently ({choice.label} and {first[1][0].label} centroids): give both the same"
                    )
                continue
            jobs.append((fqn, name, *job))
    return sorted(jobs, key=lambda job: -getattr(modules[job[0]], job[1]).numel())


def _choice(setting: LayerSetting, name: str) -> TensorChoice | None:
    """What the plan asks for one tensor; granularity applies to weights only."""
    if name == "bias":
        return None if setting.bias is None else TensorChoice(setting.bias)
    if setting.weights is None:
        return None
    return TensorChoice(setting.weights, setting.granularity, setting.group_size)


def _quantize_parameter(model: nn.Module, module: nn.Module, key: str, name: str, choice: TensorChoice,
                        importance: torch.Tensor | None) -> None:
    param = getattr(module, name)
    values = param.detach()
    _check_finite(values, key)
    centroids, indices = cluster_tensor(values, choice, importance, key=key)
    centroids_t = nn.Parameter(centroids.to(values.device), requires_grad=False)
    indices_t = indices.to(values.device)
    for owner, owner_name in _owners(model, param):
        install(owner, owner_name, centroids_t, indices_t)


def n_groups(shape: tuple[int, ...] | torch.Size, choice: TensorChoice) -> int:
    """How many codebooks ``choice`` gives a tensor of this shape (1 per tensor)."""
    if choice.granularity == "per_tensor" or len(shape) < 2:
        return 1
    return -(-shape[0] // choice.group_size)


def group_of_channel(n_channels: int, groups: int) -> torch.Tensor:
    """(C,) int64: the codebook each output channel uses, contiguous near-equal groups."""
    return torch.arange(n_channels) * groups // n_channels


def cluster_tensor(
    values: torch.Tensor, choice: TensorChoice | int, importance: torch.Tensor | None = None, *, key: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of one tensor as ``choice`` says: ``(centroids, indices)`` ready for :func:`install`.

    centroids: float32 ``(k,)``, or ``(G, k)`` per group of output channels (a group with
    fewer distinct values repeats its last centroid); indices: the shape of ``values``.
    """
    choice = TensorChoice.of(choice)
    groups = n_groups(values.shape, choice)
    rows = values.shape[0] if groups > 1 else 1
    flat = np.ascontiguousarray(values.detach().reshape(rows, -1).to("cpu", torch.float32).numpy())  # (C or 1, rest)
    weights = None if importance is None else _weights(importance, flat.shape)
    smallest = flat.size if groups == 1 else (rows // groups) * flat.shape[1]  # values of the smallest codebook
    k = min(choice.k, smallest)
    if k < choice.k:
        where = "it has" if groups == 1 else "its smallest channel group has"
        log.warning("%s: %d centroids asked for but %s only %d values; using %d (each value kept exactly)",
                    key, choice.k, where, smallest, k)
    dtype = _index_dtype(k)
    if groups == 1:
        centroids, indices = cluster(flat.reshape(-1), k, None if weights is None else weights.reshape(-1), dtype)
        return torch.from_numpy(centroids), torch.from_numpy(indices).view(values.shape)
    table = np.empty((groups, k), np.float32)
    indices = np.empty(flat.shape, dtype)
    group = group_of_channel(flat.shape[0], groups).numpy()  # (C,) codebook of each channel
    for g in range(groups):
        mine = group == g  # (C,) this group's channels
        w = None if weights is None else weights[mine].reshape(-1)
        centroids, idx = cluster(flat[mine].reshape(-1), k, w, dtype)
        table[g] = np.pad(centroids, (0, k - centroids.size), mode="edge")
        indices[mine] = idx.reshape(-1, flat.shape[1])
    return torch.from_numpy(table), torch.from_numpy(indices).view(values.shape)


def _weights(importance: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Importance as float64 clustering weights; an all-zero tensor falls back to uniform."""
    weights = importance.detach().to("cpu", torch.float64).reshape(shape).numpy()
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise PlanError("importance scores must be finite and non-negative: compute them again")
    total = weights.sum()
    if total <= 0:
        return np.ones(shape)
    return weights + IMPORTANCE_FLOOR * total / weights.size


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

    Not ``torch.nn.utils.parametrize``, on purpose: when the tensor it replaces is a Parameter
    it wraps every tensor its ``right_inverse`` returns in a Parameter, so the integer indices
    would become a Parameter instead of a buffer (optimizers, parameter counts and DDP would
    see them); it renames the tensors in memory to ``parametrizations.<name>.original0/1``,
    which the writer's skip set, ``labelless.layers`` and retraining checkpoints (written
    files) key on; and outside its ``cached()`` context it decodes on every access. The
    pre-hook below decodes at a forward pass only when the centroids or indices changed
    (their version counters, storage and device), and on every pass while the centroids train.
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
    """``centroids[indices]`` for compact (uint8/int16/int32) indices; with ``(G, k)``
    centroids, channel ``c`` (dim 0) reads row ``c * G // C``."""
    flat = indices.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int32)
    if centroids.dim() == 2:
        n_channels = indices.shape[0]
        offsets = group_of_channel(n_channels, centroids.shape[0]).to(flat.device, flat.dtype) * centroids.shape[1]
        flat = (flat.view(n_channels, -1) + offsets[:, None]).reshape(-1)  # (C * rest,)
        centroids = centroids.reshape(-1)
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
