"""Exact ``.lless`` file sizes of plans, without clustering or writing anything.

A sweep needs the size of hundreds of one-tensor plans and the search of many combined
ones; the file layout is deterministic (bit-packed indices take ceil(n*bits/8) bytes, the
headers are JSON), so the size follows from shapes and numbers of centroids alone. A test
checks that it equals the size of the file :func:`labelless.save` writes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import coding, layout
from .fileformat import fp32_safetensors_bytes, layer_table
from .layout import SAFETENSORS_DTYPES as _ST
from .plan import TensorChoice
from .quantize import n_groups, quantized_tensors

__all__ = ["FileSizer"]

class FileSizer:
    """Sizes of ``.lless`` files of one dense model under different plans.

    Example:
        >>> sizer = FileSizer(model)
        >>> sizer.size({"features.0.weight": 16}, plan=[{"layers": "features.0", "weights": 16}])
        553402111
    """

    def __init__(self, model: nn.Module, spec: Any = None, codebook_dtype: str = "float32", dense_dtype: str = "float32"):
        if quantized_tensors(model):
            raise ValueError("FileSizer takes the original (dense) model")
        spec = spec or getattr(model, "labelless_spec", None)
        self.codebook = (torch.float16 if codebook_dtype == "float16" else torch.float32, codebook_dtype)
        self.dense_half = dense_dtype == "float16"
        self.tensors, self.aliases = _distinct_tensors(model)
        self.fp32_bytes = fp32_safetensors_bytes(model)
        self.architecture = None if spec is None else spec.to_dict()
        self.layers = layer_table(model)

    def size(self, n_clusters: dict[str, int | TensorChoice], plan: list | None = None) -> int:
        """Bytes of the file with ``n_clusters[key]`` centroids (or a :class:`TensorChoice`:
        centroids and codebooks) for each quantized tensor."""
        entries, shapes = {}, {}
        for key, tensor in self.tensors.items():
            k = n_clusters.get(key)
            if k is None:
                entries[key] = self._dense(key, tensor, shapes)
            else:
                entries[key] = self._quantized(key, tensor, k, shapes)
        body = layout.header(architecture=self.architecture, plan=plan, layers=self.layers, entries=entries,
                             aliases=self.aliases, fp32_bytes=self.fp32_bytes)
        header = layout.with_checksum(body, "0" * 64, "0" * 64)  # digests: always 64 hex digits
        return layout.safetensors_size(shapes, metadata=layout.metadata(header))

    def _dense(self, key: str, tensor: torch.Tensor, shapes: dict) -> dict:
        stored = torch.float16 if self.dense_half and tensor.dtype == torch.float32 else tensor.dtype
        shapes[key] = (_ST[stored], list(tensor.shape), tensor.numel() * stored.itemsize)
        return layout.dense_entry(list(tensor.shape), tensor.dtype, stored)

    def _quantized(self, key: str, tensor: torch.Tensor, choice: int | TensorChoice, shapes: dict) -> dict:
        choice = TensorChoice.of(choice)
        k, groups = choice.k, n_groups(tensor.shape, choice)
        bits = coding.index_bits(k)
        dtype, name = self.codebook
        shape = [k] if groups == 1 else [groups, k]
        shapes[layout.codebook_name(key)] = (_ST[dtype], shape, groups * k * dtype.itemsize)
        if bits:
            n_bytes = coding.packed_size(tensor.numel(), bits)
            shapes[layout.indices_name(key)] = ("U8", [n_bytes], n_bytes)
        return layout.quantized_entry(list(tensor.shape), k, bits, "packed", name, groups)


def _distinct_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, aliases, seen = {}, {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        identity = (value.data_ptr(), value.numel(), tuple(value.stride()))
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach()
    return tensors, aliases
