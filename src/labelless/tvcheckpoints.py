"""torchvision checkpoints read as torchvision's own builders read them.

Three families' published weights do not load into a freshly built model as they are:

* **DenseNet** checkpoints use the old names ``denselayer1.norm.1.weight`` where the module is
  ``denselayer1.norm1`` today (torchvision renames them in ``densenet._load_state_dict``);
* **GoogLeNet** and **Inception v3** checkpoints hold the auxiliary classifiers (``aux1``,
  ``aux2``; ``AuxLogits``) that only training uses; labelless builds both without them, as
  torchvision does after loading, so those tensors are dropped;
* files older than BatchNorm's ``num_batches_tracked`` (all three, and ResNet's) lack it: it
  is filled in, as torch does for such files;
* their ImageNet weights also expect torchvision's ``transform_input``, which maps ImageNet-
  normalised images to images normalised with mean 0.5 and std 0.5 per channel. labelless
  builds the network without that step and normalises the input that way instead
  (:data:`TRANSFORM_INPUT_NORMALISATION`): the same arithmetic, so the same outputs.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

__all__ = ["adapt_state", "TRANSFORM_INPUT_WEIGHTS", "TRANSFORM_INPUT_NORMALISATION"]

log = logging.getLogger(__name__)

_DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                              r"running_var|num_batches_tracked))$")
_AUXILIARY = {"GoogLeNet": ("aux1.", "aux2."), "Inception3": ("AuxLogits.",)}
TRANSFORM_INPUT_WEIGHTS = ("GoogLeNet_Weights", "Inception_V3_Weights")
TRANSFORM_INPUT_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the keys torchvision's builders rename or drop mapped for ``model``; any
    other state comes back as it is (the caller still checks every key and shape)."""
    expected = model.state_dict()
    if type(model).__name__ == "DenseNet":
        state = _renamed(state, expected)
    auxiliary = _AUXILIARY.get(type(model).__name__)
    if auxiliary:
        state = _without_auxiliary(state, expected, auxiliary)
    return _with_batch_counts(state, expected)


def _with_batch_counts(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """Files older than BatchNorm's ``num_batches_tracked`` (torchvision's published ones) lack
    it; torch fills it in for such files, and so does this (inference never reads it)."""
    counts = {key: expected[key] for key in expected if key.endswith(".num_batches_tracked") and key not in state
              and f"{key.rsplit('.', 1)[0]}.running_mean" in state}
    return dict(state, **counts) if counts else state


def _renamed(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        match = None if key in expected else _DENSENET_LEGACY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    if any(a != b for a, b in zip(state, renamed)):
        log.info("renamed the checkpoint's DenseNet keys from the old naming (norm.1 -> norm1), as torchvision does")
    return renamed


def _without_auxiliary(state: dict[str, torch.Tensor], expected: dict, prefixes: tuple[str, ...]
                       ) -> dict[str, torch.Tensor]:
    dropped = [key for key in state if key.startswith(prefixes) and key not in expected]
    if not dropped:
        return state
    log.info("dropped the checkpoint's %d tensors of the auxiliary classifiers (%s): inference does not use "
             "them, and labelless builds the network without them", len(dropped), ", ".join(p[:-1] for p in prefixes))
    return {key: value for key, value in state.items() if key not in dropped}
