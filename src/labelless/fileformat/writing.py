"""Writing a model, quantized or not, to a ``.lless`` file (atomically)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from .. import coding, layout
from ..config import Choice
from ..errors import LabellessError
from ..io import atomic_path
from ..layers import list_layers
from ..layout import DTYPES, SAFETENSORS_DTYPES, header_digest, safetensors_size, tensors_digest
from ..models import ModelSpec
from ..quantize import quantized_tensors
from .inspecting import inspect

log = logging.getLogger(__name__)


class Entropy(Choice):
    """How a file codes its indices: bit-packed, or entropy-coded with rANS (lossless)."""

    NONE = "none"
    ANS = "ans"


def save(
    model: nn.Module,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    codebook_dtype: str = "float32",
    dense_dtype: str = "float32",
    entropy: str = "none",
) -> dict[str, Any]:
    """Write ``model`` (quantized or not) to a ``.lless`` file; returns :func:`inspect`'s report.

    ``codebook_dtype``/``dense_dtype`` ``"float16"`` halve codebooks / other tensors (the
    loaded model then equals this one with those tensors rounded to fp16); ``entropy="ans"``
    entropy-codes the indices, losslessly.

    Example:
        >>> report = save(quantize(model, plan), "model.lless")
        >>> report["size_reduction"]
        0.87
    """
    for name, value, valid in (("codebook_dtype", codebook_dtype, ("float32", "float16")),
                               ("dense_dtype", dense_dtype, ("float32", "float16")),
                               ("entropy", entropy, tuple(Entropy))):
        if value not in valid:
            raise LabellessError(f"{name} must be one of {list(valid)}, got {value!r}")
    spec = spec or getattr(model, "labelless_spec", None)
    tensors, entries, aliases = _encode_state(model, codebook_dtype, dense_dtype, entropy)
    body = layout.header(architecture=None if spec is None else spec.to_dict(), plan=_plan_data(model),
                         layers=layer_table(model), entries=entries, aliases=aliases,
                         fp32_bytes=fp32_safetensors_bytes(model))
    header = layout.with_checksum(body, tensors_digest(tensors), header_digest(body))
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=layout.metadata(header))
    return inspect(path)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """The header's ``layers``: every quantizable layer's position, name and type."""
    return [{"index": l.index, "name": l.name, "type": l.type} for l in list_layers(model)]


def _plan_data(model: nn.Module) -> list | None:
    plan = getattr(model, "labelless_plan", None)
    return None if plan is None else plan.to_data()


def _encode_state(model: nn.Module, codebook_dtype: str, dense_dtype: str, entropy: str):
    quantized = quantized_tensors(model)
    by_storage = {(id(qt.centroids), id(qt.indices)): key for key, qt in quantized.items()}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for key, qt in quantized.items():
        first = by_storage[(id(qt.centroids), id(qt.indices))]
        if first != key:
            aliases[key] = first
            continue
        entries[key] = _encode_quantized(key, qt, codebook_dtype, entropy, tensors)
    quantized_names = {f"{key}_{suffix}" for key in quantized for suffix in ("centroids", "indices")}
    seen: dict[tuple[int, int, tuple], str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in quantized_names:
            continue
        value = value.detach()
        identity = (value.data_ptr(), value.numel(), tuple(value.stride()))
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        entries[key] = _encode_dense(key, value, dense_dtype, tensors)
    return tensors, entries, aliases


# The bytes a tensor's counts add to the safetensors header (its name, dtype, shape, offsets) and
# the alignment padding, over-estimated: an ANS-coded tensor is kept only if it is smaller by
# more, so a file never exceeds the bit-packed size FileSizer gives a size budget.
_COUNTS_ENTRY_BYTES = 96


def _ans_if_smaller(key: str, indices: np.ndarray, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ANS-coded indices and their counts, or None where bit-packing is no larger: an unused
    centroid cannot be coded, and a small or near-uniform tensor gains less than its counts cost."""
    counts = np.bincount(indices, minlength=k).astype(np.int64)
    if (counts == 0).any():
        return None
    data = coding.ans_encode(indices, counts)
    extra = counts.nbytes + len(layout.counts_name(key)) + _COUNTS_ENTRY_BYTES
    if data.nbytes + extra >= coding.packed_size(indices.size, bits):
        return None
    return torch.from_numpy(data), torch.from_numpy(counts)


def _encode_quantized(key: str, qt, codebook_dtype: str, entropy: str, tensors: dict) -> dict:
    k = qt.n_clusters
    bits = coding.index_bits(k)
    indices = qt.indices.detach().cpu().numpy().reshape(-1)
    tensors[layout.codebook_name(key)] = qt.centroids.detach().cpu().to(DTYPES[codebook_dtype]).contiguous()
    coded = _ans_if_smaller(key, indices, k, bits) if entropy == Entropy.ANS and k > 1 else None
    use_ans = coded is not None
    if use_ans:
        tensors[layout.indices_name(key)], tensors[layout.counts_name(key)] = coded
    elif bits:
        tensors[layout.indices_name(key)] = torch.from_numpy(coding.pack(indices, bits))
    return layout.quantized_entry(list(qt.indices.shape), k, bits, "ans" if use_ans else "packed", codebook_dtype,
                                  qt.n_codebooks)


def _encode_dense(key: str, value: torch.Tensor, dense_dtype: str, tensors: dict) -> dict:
    stored = value.cpu().contiguous()
    if dense_dtype == "float16" and value.dtype == torch.float32:
        stored = stored.half()
    tensors[key] = stored.clone() if stored.data_ptr() == value.data_ptr() else stored
    return layout.dense_entry(list(value.shape), value.dtype, stored.dtype)


def fp32_safetensors_bytes(model: nn.Module) -> int:
    """Size of the model's dense fp32 state_dict saved as a safetensors file (computed)."""
    shapes: dict[str, tuple[str, list[int], int]] = {}
    quantized = quantized_tensors(model)
    for key, qt in quantized.items():
        shapes[key] = ("F32", list(qt.indices.shape), qt.indices.numel() * 4)
    skip = {f"{key}_{s}" for key in quantized for s in ("centroids", "indices")}
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in skip:
            dtype = torch.float32 if value.is_floating_point() else value.dtype
            shapes[key] = (SAFETENSORS_DTYPES[dtype], list(value.shape), value.numel() * dtype.itemsize)
    return safetensors_size(shapes)
