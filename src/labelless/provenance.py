"""Where a sweep's rows came from, so that a later search measures on the same model and images.

A sweep records in ``sweep.json`` the model's spec, a digest of its weights and the data it read
(as its caller describes it), and keeps the original model's outputs on its images in
``outputs.safetensors``. ``labelless search`` rebuilds the model and the images from that record
alone, and refuses in one line a model or images that no longer match it, instead of ranking
plans on outputs the sweep never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from .errors import LabellessError
from .io import atomic_write_bytes
from .models import state_digest

__all__ = ["OUTPUTS_FILE", "record", "save_outputs", "check_weights", "check_outputs"]

OUTPUTS_FILE = "outputs.safetensors"  # the original model's logits on the sweep's images
_TOLERANCE = 1e-3  # of the largest logit: another device or thread count moves the last digits, other data far more


def record(model: nn.Module, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The provenance of a sweep of ``model``: its spec, its weights' digest, and ``data`` (what
    the caller read the images from: dataset specs, limit, seed), JSON-ready."""
    spec = getattr(model, "labelless_spec", None)
    return {"model": spec.to_dict() if spec is not None else None, "weights_digest": state_digest(model),
            "data": dict(data or {})}


def save_outputs(teacher: torch.Tensor, folder: Path) -> None:
    """The original model's outputs on the sweep's images, next to ``sweep.json``."""
    data = safetensors.torch.save({"logits": teacher.detach().float().cpu().contiguous()})
    atomic_write_bytes(folder / OUTPUTS_FILE, data)


def check_weights(provenance: Mapping[str, Any], model: nn.Module, folder: Path) -> None:
    """One line unless ``model`` holds the very weights the sweep in ``folder`` measured."""
    if state_digest(model) != provenance.get("weights_digest"):
        weights = provenance.get("data", {}).get("weights")
        what = f"the weights {weights!r}" if weights else "the weights of a model built without any (random, new each time)"
        raise LabellessError(f"{what} differ from those the sweep in {folder} measured (another digest): "
                             f"run the sweep again")


def check_outputs(folder: Path, teacher: torch.Tensor) -> None:
    """One line unless the original's outputs on the images rebuilt now are those the sweep saw."""
    path = folder / OUTPUTS_FILE
    try:
        saved = safetensors.torch.load_file(str(path))["logits"]
    except (OSError, KeyError, safetensors.SafetensorError) as exc:
        raise LabellessError(f"cannot read {path} ({type(exc).__name__}): run the sweep in {folder} again") from None
    now = teacher.detach().float().cpu()
    scale = _TOLERANCE * max(1.0, float(saved.abs().max())) if saved.numel() else 0.0
    if saved.shape != now.shape or not torch.allclose(saved, now, rtol=0.0, atol=scale):
        raise LabellessError(f"the images read now are not those the sweep in {folder} measured (the original's "
                             f"outputs on them differ): the dataset changed since; run the sweep again")
