"""Rebuilding a model from a ``.lless`` file: the architecture on the meta device first, then the tensors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import coding, layout, zoo
from ..errors import FileFormatError, LabellessError, ModelError
from ..layout import DTYPES
from ..models import ModelSpec, build_model
from ..quantize import install
from .checks import quote, short
from .reading import LlessFile, read

log = logging.getLogger(__name__)

DEFAULT_MAX_PARAMS = 1 << 30


def load(path: str | Path, model: nn.Module | None = None, *, max_params: int = DEFAULT_MAX_PARAMS,
         custom: str | None = None) -> nn.Module:
    """Rebuild the model saved in a ``.lless`` file.

    Quantized tensors come back as codebook + indices (so the model can be retrained or
    saved again); outputs are bit-identical to the model that was saved. A file written
    from a custom ``nn.Module`` needs that module (freshly constructed) as ``model``; one whose
    spec names a custom class (``package.module:ClassName``) is rebuilt from it, with the
    constructor arguments it records, only when ``custom`` names that same class: loading a
    file never imports code on its own.

    Example:
        >>> model = load("model.lless")
        >>> logits = model.eval()(images)
        >>> mine = load("net.lless", custom="mymodels:Net")
    """
    lless = read(path)
    if model is None:
        _check_trusted(lless, custom)
    target = _target_model(lless, model, max_params)
    _fill(target, lless)
    target.eval()
    return target


def _check_trusted(lless: LlessFile, custom: str | None) -> None:
    """Refuse a file whose spec names a custom class unless the caller named that same class."""
    try:
        spec = lless.spec
    except ModelError:
        return  # _target_model says what is wrong with it
    if custom is not None and (spec is None or zoo.model_source(spec.name) != "custom"):
        log.warning("%s holds no custom model: the custom class %s is not used", lless.path, custom)
    if spec is not None and zoo.model_source(spec.name) == "custom" and custom != spec.name:
        raise LabellessError(f"{lless.path} holds the custom model {spec.name}: labelless imports no code a file "
                             f"names; name it yourself (--model {spec.name} on the command line, "
                             f"load(path, custom=\"{spec.name}\") in Python)")


def _target_model(lless: LlessFile, model: nn.Module | None, max_params: int) -> nn.Module:
    if model is not None:
        _check_shapes(model, lless)
        return model
    try:
        spec = lless.spec
    except ModelError as exc:
        raise FileFormatError(f"{lless.path}: the architecture in the file is unusable: {exc}") from None
    if spec is None:
        raise LabellessError(f"{lless.path} holds a custom model: pass a freshly built one, load(path, model=...)")
    skeleton = _meta_model(spec, lless, max_params)
    n_params = sum(v.numel() for v in skeleton.state_dict().values())
    if n_params > max_params:
        raise FileFormatError(f"{lless.path}: declares a model of {n_params} values, above the limit of {max_params}")
    _check_shapes(skeleton, lless)
    if not any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
        return skeleton  # nothing was left on the meta device (see _meta_model)
    persistent = set(skeleton.state_dict())
    if zoo.model_source(spec.name) == "custom" or any(name not in persistent for name, _ in skeleton.named_buffers()):
        return build_model(spec)  # the user's own code, or non-persistent buffers: real initial values
    return skeleton.to_empty(device="cpu")


def _meta_model(spec: ModelSpec, lless: LlessFile, max_params: int) -> nn.Module:
    """The architecture without memory, so that its shapes are checked before anything is allocated.

    Some torchvision code cannot run entirely on the meta device (regnet_* computes its widths
    with tensors): it is built again with only small tensors on the CPU (:class:`_SmallOnCpu`),
    so that a file naming a huge model still allocates nothing big before its shapes are checked.
    """
    try:
        return build_model(spec, device="meta")
    except Exception:  # noqa: BLE001 - retried with the small tensors real
        pass
    try:
        with _SmallOnCpu():
            return build_model(spec)
    except Exception as exc:  # noqa: BLE001 - cannot be rebuilt without allocating it: refuse
        raise FileFormatError(f"{lless.path}: labelless cannot rebuild {spec.name} without allocating it "
                              f"({short(exc)}): load(path, model=...) with a freshly built model works") from None


class _SmallOnCpu(torch.overrides.TorchFunctionMode):
    """Tensor factories for the CPU make tensors of at most ``limit`` values there (the arithmetic
    some constructors do), bigger ones on the meta device (the parameters)."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint}
    limit = 1 << 16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # build_model's torch.device("cpu") has set the device already: the CPU counts as none given
        if func in self.FACTORIES and str(kwargs.get("device") or "cpu") == "cpu":
            kwargs["device"] = "meta" if _requested_values(func, args) > self.limit else "cpu"
        return func(*args, **kwargs)


def _requested_values(func, args: tuple) -> int:
    """The number of values a factory call asks for (its size arguments)."""
    sizes = args[1] if func is torch.randint and len(args) > 1 else args
    if func is torch.full:
        sizes = args[:1]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = sizes[0]
    return math.prod(int(d) for d in sizes if isinstance(d, int)) if sizes else 0


def _check_shapes(model: nn.Module, lless: LlessFile) -> None:
    entries, aliases = lless.header["tensors"], lless.header["aliases"]
    state = model.state_dict()
    expected = {k: list(v.shape) for k, v in state.items()}
    declared = {k: e["shape"] for k, e in entries.items()}
    declared.update({k: entries[t]["shape"] for k, t in aliases.items()})
    if expected != declared:
        diff = sorted(set(expected) ^ set(declared)) or [k for k in expected if expected[k] != declared[k]]
        raise FileFormatError(
            f"{lless.path}: its tensors do not fit the model it names ({quote(diff[:3])[1:-1]}): "
            "the file is corrupted or was written for another architecture"
        )
    _check_kinds(model, state, lless)
    _check_sharing(model, lless)


def _check_sharing(model: nn.Module, lless: LlessFile) -> None:
    """One tensor of the model (a shared module) must be one tensor in the file, not several."""
    aliases = lless.header["aliases"]
    first_name: dict[int, tuple[str, str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        source = aliases.get(key, key)
        first, first_source = first_name.setdefault(id(value), (key, source))
        if first_source != source and value.numel():  # the writer stores empty tensors apart
            raise FileFormatError(f"{lless.path}: {quote(key)} and {quote(first)} are one tensor in the model "
                                  "but two in the file: the file is corrupted or was written for another model")


def _check_kinds(model: nn.Module, state: dict[str, torch.Tensor], lless: LlessFile) -> None:
    """Quantized tensors must be parameters (a buffer would keep uninitialised memory), and
    dense tensors of the model's dtype (a copy into another dtype would change the values)."""
    entries, aliases = lless.header["tensors"], lless.header["aliases"]
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key, value in state.items():
        entry = entries[aliases.get(key, key)]
        if entry["kind"] == "quantized" and key not in params:
            raise FileFormatError(f"{lless.path}: {quote(key)} is quantized in the file but is not a "
                                  "parameter of the model: the file is corrupted")
        if entry["kind"] == "dense" and DTYPES[entry["dtype"]] != value.dtype:
            raise FileFormatError(f"{lless.path}: {quote(key)} is {entry['dtype']} in the file but {value.dtype} "
                                  "in the model: the file is corrupted or was written for another model")


def _fill(model: nn.Module, lless: LlessFile) -> None:
    entries, aliases = lless.header["tensors"], lless.header["aliases"]
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module under each name
    built: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for key in list(entries) + list(aliases):
        source = aliases.get(key, key)
        entry = entries[source]
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if entry["kind"] == "quantized":
            if source not in built:
                built[source] = _decode_quantized(source, entry, lless)
            install(module, name, *built[source])
        else:
            value = lless.tensors[source].to(DTYPES[entry["dtype"]])
            target = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
            with torch.no_grad():
                target.copy_(value)


def _decode_quantized(key: str, entry: dict, lless: LlessFile) -> tuple[nn.Parameter, torch.Tensor]:
    centroids = lless.tensors[layout.codebook_name(key)].float()  # (k,) or (G, k)
    if not torch.isfinite(centroids).all():
        raise FileFormatError(f"{lless.path}: tensor {quote(key)} has non-finite centroids: the file is corrupted")
    try:
        indices = _decode_indices(key, entry, lless.tensors)  # (n_values,)
    except FileFormatError as exc:
        raise FileFormatError(f"{lless.path}: tensor {quote(key)}: {exc}") from None
    return nn.Parameter(centroids, requires_grad=False), torch.from_numpy(indices).view(entry["shape"])


def _decode_indices(key: str, entry: dict, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    k, bits, n_values = entry["n_clusters"], entry["bits"], math.prod(entry["shape"])
    dtype = np.uint8 if k <= 256 else (np.int16 if k <= 32768 else np.int32)
    if bits == 0:
        return np.zeros(n_values, dtype)
    data = tensors[layout.indices_name(key)].numpy()
    if entry["coding"] == "ans":
        return coding.ans_decode(data, tensors[layout.counts_name(key)].numpy(), n_values, dtype)
    return coding.unpack(data, bits, n_values, k, dtype)
