"""Where a model name comes from: torchvision (``resnet18``), timm (``timm:mobilenetv3_small_100``)
or the user's own code (``package.module:ClassName``, with constructor arguments).

torchvision and timm models are built from their registries, never from code a file names.
A custom class is imported only when a person names it (``--model pkg.mod:Net`` on the command
line, ``load(path, custom="pkg.mod:Net")`` in Python): a ``.lless`` file records the name, but
loading that file never imports it on its own.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from torch import nn

from .errors import ModelError

__all__ = ["TIMM_PREFIX", "model_source", "check_name", "build_timm", "build_custom"]

TIMM_PREFIX = "timm:"
_CUSTOM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def model_source(name: str) -> str:
    """``"timm"``, ``"custom"`` or ``"torchvision"`` for a model name."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    return "custom" if ":" in name else "torchvision"


def check_name(name: str, kwargs: dict[str, Any]) -> None:
    """Raise :class:`ModelError` unless a timm or custom name is well formed (nothing imported
    for a custom one); torchvision names are checked by :mod:`labelless.models`."""
    source = model_source(name)
    if kwargs and source != "custom":
        raise ModelError(f"model arguments are for a custom model (package.module:ClassName), not {name!r}")
    if source == "timm" and not re.fullmatch(r"[\w.]+", name[len(TIMM_PREFIX):]):
        raise ModelError(f"timm model name {name!r} must read timm:NAME, e.g. timm:mobilenetv3_small_100")
    if source == "custom" and not _CUSTOM.fullmatch(name):
        raise ModelError(f"custom model {name!r} must read package.module:ClassName (an importable module, "
                         f"then the class or function that builds the model)")


def build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised timm model (no pretrained weights are fetched). The name is checked
    here, not when a spec is read, so that a file of a timm model can be inspected without timm."""
    timm, short = _timm(), name[len(TIMM_PREFIX):]
    if short not in timm.list_models():
        raise ModelError(f"timm has no model {short!r}: `python -c \"import timm; "
                         f"print(timm.list_models('*mobilenet*'))\"` lists them")
    return timm.create_model(short, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def build_custom(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``ClassName(**kwargs)`` from ``package.module`` (the working folder importable too, as
    ``python -m`` would have it)."""
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(_import_from_here(module_name), attr)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for the custom model {name!r} ({exc}): run from the "
                         f"folder that holds it, or put it on PYTHONPATH") from None
    except AttributeError:
        raise ModelError(f"{module_name} has no {attr!r} for the custom model {name!r}") from None
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"{name}({', '.join(f'{k}=...' for k in kwargs)}) failed: {exc}; give its constructor "
                         f"arguments with --model-args") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_from_here(module_name: str):
    """``import module_name`` with the working folder importable for that import only."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need timm: pip install 'labelless[timm]' (or pip install timm)") from None
    return timm
