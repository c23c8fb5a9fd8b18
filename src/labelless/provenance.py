"""Where a sweep's rows came from, so that a later search measures on the same model and images.

A sweep records in ``sweep.json`` the model's spec, a sha256 digest of its weights, one of the
images it measured on (their uint8 pixels, before any preprocessing, so it does not depend on
the device), whether its k-means was importance-weighted (the scores are kept beside it), and
where the images came from (:func:`data_record`: weights file, dataset specs, limit, seed).
``labelless search`` rebuilds the model and the images from that record alone, and refuses in
one line weights or images that no longer match it, instead of ranking plans on images the
sweep's rows were not measured on. The search runs the original on them again on its own
device, so that the original's and the quantized models' outputs come from the same kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .errors import LabellessError
from .models import state_digest

__all__ = ["IMPORTANCE_FILE", "data_record", "record", "check", "check_weights", "check_images", "again"]

IMPORTANCE_FILE = "importance.safetensors"  # the importance the sweep's k-means was weighted by

# field -> (allowed types, what it is): a hand-edited record fails in one line, not deep inside
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "weights": ((str, type(None)), "a weights file or name, or null"),
    "unlabeled": ((str,), "a dataset spec"),
    "labeled": ((str, type(None)), "a dataset spec or null"),
    "limit": ((int, type(None)), "a whole number or null"),
    "seed": ((int,), "a whole number"),
    "skip_unreadable": ((bool,), "true or false"),
    "batch_size": ((int,), "a whole number"),
    "by": ((str,), "the command that swept"),
}


def data_record(*, weights: str | None, unlabeled: str, labeled: str | None, limit: int | None, seed: int,
                skip_unreadable: bool, batch_size: int, by: str) -> dict[str, Any]:
    """Where a sweep's weights and images come from (paths already absolute), and which command
    (``labelless sweep`` or ``labelless run``) swept, for the advice of a later error."""
    return {"weights": weights, "unlabeled": unlabeled, "labeled": labeled, "limit": limit, "seed": seed,
            "skip_unreadable": skip_unreadable, "batch_size": batch_size, "by": by}


def record(model: nn.Module, images_digest: str, data: Mapping[str, Any] | None, importance: bool) -> dict[str, Any]:
    """The provenance of a sweep of ``model`` on images of ``images_digest``, JSON-ready."""
    spec = getattr(model, "labelless_spec", None)
    return {"model": spec.to_dict() if spec is not None else None, "weights_digest": state_digest(model),
            "images_digest": images_digest, "importance": importance, "data": dict(data or {})}


def check(provenance: Any, folder: Path) -> dict[str, Any]:
    """``provenance`` as :func:`record` wrote it, or one line saying to sweep again."""
    data = provenance.get("data") if isinstance(provenance, dict) else None
    if not isinstance(data, dict) or not isinstance(provenance.get("model"), dict) or set(_FIELDS) - set(data):
        raise LabellessError(f"{folder}/sweep.json does not say what it measured (no provenance: written by an "
                             f"older labelless or not by a sweep): run the same `labelless sweep` (or `labelless "
                             f"run`) again, which reuses its finished rows")
    for name, (types, what) in _FIELDS.items():
        value = data[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise LabellessError(f"{folder}/sweep.json: provenance field {name!r} must be {what}, got {value!r}: "
                                 f"{again(provenance)}")
    return provenance


def check_weights(provenance: Mapping[str, Any], model: nn.Module, folder: Path) -> None:
    """One line unless ``model`` holds the very weights the sweep in ``folder`` measured."""
    if state_digest(model) != provenance.get("weights_digest"):
        weights = provenance["data"]["weights"]
        what = f"the weights {weights!r}" if weights else "the weights of a model built without any (random, new each time)"
        raise LabellessError(f"{what} differ from those the sweep in {folder} measured (another digest): "
                             f"{again(provenance)}")


def check_images(provenance: Mapping[str, Any], images_digest: str, folder: Path) -> None:
    """One line unless the images read now are, pixel for pixel, those the sweep measured."""
    if images_digest != provenance.get("images_digest"):
        raise LabellessError(f"the images read now are not those the sweep in {folder} measured (other pixels): "
                             f"the dataset changed since; {again(provenance)}")


def again(provenance: Mapping[str, Any]) -> str:
    """The advice that ends a refusal: sweep again, with the command that swept."""
    by = provenance.get("data", {}).get("by") if isinstance(provenance, Mapping) else None
    return f"run the same `{by}` again" if by in ("labelless sweep", "labelless run") else "run the sweep again"
