"""ONNX export that stays compressed: codebooks and bit-packed indices, rebuilt in the graph.

The dense graph comes from ``torch.onnx.export`` of the dequantized model. Then every fp32
initializer whose values are exactly those of a quantized tensor is replaced by

* ``<name>::codebook`` (k,) float32 and ``<name>::indices`` (G, b) uint8: the indices
  bit-packed b = ceil(log2 k) bits each, least significant bit first (the ``.lless``
  layout), padded to G = ceil(n / 8) blocks of 8 indices (8 indices of b bits = b bytes);
* a small subgraph producing a tensor of the original name (opset >= 18)::

      Cast(uint32) -> Gather(axis=1) [-> BitShift(LEFT) -> BitwiseOr, when an index spans bytes]
        -> BitShift(RIGHT) -> BitwiseAnd(2**b - 1)          # (G, 8) indices
        -> Reshape(-1) [-> Slice(0, n)] -> Cast(int32) -> Gather(codebook) -> Reshape(shape)

  or, for k = 1, ``Expand(codebook, shape)`` with no index data at all.

  Per-channel codebooks, ``<name>::codebook`` (G, k): the indices of output channel c are
  offset by ``(c * G // C) * k`` into the flattened codebook before the Gather
  (``Reshape(C, -1) -> Add(<name>::offsets (C, 1)) -> Reshape(-1)``).

The subgraph depends on initializers only, so ONNX Runtime folds it into a plain weight when
the session loads (default optimisation level): inference then runs exactly as the dense
graph does. Replacing by value, not by name, means an exporter that renames or transforms a
weight can never get the wrong values: such a weight merely stays dense (with a warning).
"""

from __future__ import annotations

import inspect as _inspect
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import coding, onnxfile
from .errors import LabellessError
from .fileformat import load, read
from .io import check_output_dir
from .models import ModelSpec
from .quantize import QuantizedTensor, dequantize, quantized_tensors

__all__ = ["DEFAULT_OPSET", "EXPORTERS", "MAX_OPSET", "MIN_COMPRESSED_OPSET", "export_onnx"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_COMPRESSED_OPSET = 18  # BitwiseAnd / BitwiseOr
MIN_OPSET = 13
MAX_OPSET = 20  # the highest opset torch's TorchScript exporter writes
EXPORTERS = ("auto", "torchscript", "dynamo")


def export_onnx(
    source: str | Path | nn.Module,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    example_input: torch.Tensor | None = None,
    dense: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    input_size: int | None = None,
    custom: str | None = None,
) -> dict[str, Any]:
    """Write ``source`` (a ``.lless`` path or a quantized model) as an ONNX file; returns sizes.

    By default each quantized tensor is stored as its codebook plus bit-packed indices and
    rebuilt inside the graph, so the file is about as small as the ``.lless`` file;
    ``dense=True`` writes plain fp32 weights instead. The input is ``input`` (batch, C, H, W),
    the output ``logits``; the batch is always dynamic, and so are height and width where the
    network allows it (checked by running the graph at a second size; where it does not, the
    graph keeps the export size and ``report["dynamic_size"]`` is False). The export size is
    ``input_size`` if given, else what the source says: its ``spec``, its ``labelless_spec``, or
    ``example_input``. ``exporter`` picks torch's
    exporter: ``"torchscript"`` (``dynamo=False``), ``"dynamo"`` (needs onnxscript), or
    ``"auto"`` (TorchScript where torch still has it). ``custom``: as in :func:`labelless.load`,
    the custom class a ``.lless`` file's spec names, when you trust it to be imported.

    The report holds ``onnx_bytes``, ``lless_bytes`` and their ``ratio`` (``None`` for a
    model source), ``compressed_tensors`` (quantized tensors stored as codebook + indices)
    and ``kept_dense_tensors`` (quantized tensors the exporter changed, left dense).

    Example:
        >>> report = export_onnx("model.lless", "model.onnx")
        >>> report["onnx_bytes"], report["lless_bytes"], report["ratio"]
        (1467820, 1412296, 1.04)
    """
    _require_onnx()
    _check_options(opset, dense, exporter)
    check_output_dir(path)
    model, example, spec, lless_bytes = _source_model(source, spec, example_input, custom)
    example = _resized(example, input_size)
    plain = dequantize(model).eval().to("cpu", torch.float32)
    proto, dynamic_size = _export_any_size(_exportable_pooling(plain, example), example, opset, exporter)
    counts = {"compressed_tensors": 0, "kept_dense_tensors": 0}
    if not dense:
        counts = _compress_graph(proto.graph, quantized_tensors(model))
    _add_metadata(proto, spec)
    files = onnxfile.save(proto, path)
    onnx_bytes = sum(file.stat().st_size for file in files)
    ratio = None if lless_bytes is None else onnx_bytes / lless_bytes
    report = {"path": str(path), "dense": dense, "opset": opset, "onnx_bytes": onnx_bytes,
              "lless_bytes": lless_bytes, "ratio": ratio, "input_shape": ["batch", *example.shape[1:2],
              *(["height", "width"] if dynamic_size else example.shape[2:])], "dynamic_size": dynamic_size,
              "files": [str(file) for file in files], **counts}
    log.info("wrote %s: %d bytes%s", path, onnx_bytes, "" if ratio is None else f", {ratio:.3f}x the .lless file")
    return report


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise LabellessError("ONNX export needs the onnx package: pip install labelless[onnx]") from None
    return onnx


def _check_options(opset: int, dense: bool, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise LabellessError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    low = MIN_OPSET if dense else MIN_COMPRESSED_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= MAX_OPSET:
        hint = "" if dense else f" (the compressed graph needs BitwiseAnd, opset {MIN_COMPRESSED_OPSET}; use --dense for older)"
        raise LabellessError(f"opset must be a whole number in [{low}, {MAX_OPSET}], got {opset!r}{hint}")


def _source_model(
    source: str | Path | nn.Module, spec: ModelSpec | None, example_input: torch.Tensor | None, custom: str | None
) -> tuple[nn.Module, torch.Tensor, ModelSpec | None, int | None]:
    """(model, example input of batch 1, spec, .lless bytes or None)."""
    if isinstance(source, (str, Path)):
        lless = read(source)
        if lless.spec is None:
            raise LabellessError(
                f"{source} holds a custom model: export load(path, model=...) with an example_input instead"
            )
        return load(source, custom=custom), lless.spec.example_input(1), lless.spec, lless.file_bytes
    if not isinstance(source, nn.Module):
        raise LabellessError(f"source must be a .lless path or a model, got {type(source).__name__}")
    spec = spec or getattr(source, "labelless_spec", None)
    if example_input is None and spec is None:
        raise LabellessError("a model source needs spec= or example_input= to fix its input shape")
    example = example_input[:1] if example_input is not None else spec.example_input(1)
    return source, example.detach().to("cpu", torch.float32), spec, None


def _resized(example: torch.Tensor, input_size: int | None) -> torch.Tensor:
    if input_size is None:
        return example
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise LabellessError(f"input size must be a whole number of pixels >= 1, got {input_size!r}")
    return torch.zeros(*example.shape[:2], input_size, input_size)


class _FixedAdaptiveAvgPool(nn.Module):
    """``AdaptiveAvgPool2d`` for one input size as two averaging matrices (plain MatMuls in ONNX),
    for the case torch's exporter refuses: an output size that is not a factor of the input's
    (VGG's 7x7 from the 1x1 map of a 32-px image)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _averaging(in_size[0], out_size[0]))
        self.register_buffer("cols", _averaging(in_size[1], out_size[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


def _averaging(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages inputs floor(i n_in / n_out) .. ceil((i+1) n_in / n_out) - 1, as
    adaptive pooling does."""
    matrix = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _exportable_pooling(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` with each AdaptiveAvgPool2d whose output size is no factor of its input size at
    ``example``'s size replaced by :class:`_FixedAdaptiveAvgPool` (the graph then keeps that size)."""
    sizes: dict[str, tuple[int, int]] = {}
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it is
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    for name, size in sizes.items():
        out = tuple(pools[name](torch.zeros(1, 1, *size)).shape[-2:])
        if any(i % o for i, o in zip(size, out)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _FixedAdaptiveAvgPool(size, out))
    return model


def _export_any_size(model: nn.Module, example: torch.Tensor, opset: int, exporter: str):
    """(ModelProto, dynamic height and width?): dynamic where the graph proves right at a second size."""
    try:
        proto = _export_dense(model, example, opset, exporter, spatial=True)
    except LabellessError:
        proto = None
    if proto is not None and _runs_at_another_size(proto, model, example):
        return proto, True
    log.info("the network fixes its input at %s x %s: exported for that size only (input_size= for another)",
             *example.shape[2:])
    return _export_dense(model, example, opset, exporter, spatial=False), False


def _runs_at_another_size(proto, model: nn.Module, example: torch.Tensor) -> bool:
    """Whether the exported graph, run by onnxruntime at a second input size (batch 2), gives
    what the model gives there. Without onnxruntime: False (the safe, fixed-size export)."""
    try:
        import onnxruntime  # noqa: F401 - onnxfile.session uses it
    except ImportError:
        return False
    other = torch.randn(2, example.shape[1], *(d + 16 for d in example.shape[2:]))
    try:
        with torch.no_grad():
            expected = model(other).numpy()
        got = onnxfile.session(proto).run(None, {"input": other.numpy()})[0]
    except Exception:  # noqa: BLE001 - a size the network or the graph cannot take: fixed size
        return False
    return got.shape == expected.shape and bool(np.allclose(got, expected, rtol=1e-3, atol=1e-3))


# -- the dense graph -------------------------------------------------------------------------


def _export_dense(model: nn.Module, example: torch.Tensor, opset: int, exporter: str, spatial: bool = False):
    """The model as an ONNX ModelProto with fp32 initializers (BatchNorm kept, not folded)."""
    model = model.to("cpu", torch.float32)
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and not _has_torchscript_exporter())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            if use_dynamo:
                return _export_dynamo(model, example, opset, spatial)
            return _export_torchscript(model, example, opset, spatial)
    except torch.onnx.errors.OnnxExporterError as exc:  # what torch cannot express in ONNX
        hint = "the TorchScript one (--exporter torchscript)" if use_dynamo else "the dynamo one (--exporter dynamo)"
        raise LabellessError(f"torch's ONNX exporter cannot export this model ({_first_sentence(exc)}): "
                             f"try {hint} or another input size") from None


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int, spatial: bool):
    axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    return onnxfile.exported(lambda file: torch.onnx.export(  # to a file: past 2 GiB, torch writes external data
        model, (example,), file, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": axes, "logits": {0: "batch"}}, opset_version=opset,
        training=torch.onnx.TrainingMode.PRESERVE,  # EVAL would fold BatchNorm into the weights
        do_constant_folding=False, **({"dynamo": False} if "dynamo" in _export_parameters() else {}),
    ))


def _first_sentence(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0].split(". ")[0] if lines else type(exc).__name__)[:200]


def _export_parameters() -> set[str]:
    return set(_inspect.signature(torch.onnx.export).parameters)


def _has_torchscript_exporter() -> bool:
    return "dynamic_axes" in _export_parameters() and "do_constant_folding" in _export_parameters()


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int, spatial: bool):
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise LabellessError("torch's dynamo ONNX exporter needs onnxscript: pip install onnxscript") from None
    shapes = {0: torch.export.Dim("batch")}
    if spatial:
        shapes.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    example = example.expand(2, *example.shape[1:]).contiguous()  # batch 1 would be specialised
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
        dynamic_shapes=(shapes,), opset_version=opset, verbose=False,
        optimize=False,  # its optimiser folds BatchNorm into conv weights under the same names
    )
    return program.model_proto


def _add_metadata(proto, spec: ModelSpec | None) -> None:
    from . import __version__

    entry = proto.metadata_props.add()
    entry.key, entry.value = "labelless.version", __version__
    if spec is not None:  # its mean/std say how to normalise the input
        entry = proto.metadata_props.add()
        entry.key, entry.value = "labelless.architecture", json.dumps(spec.to_dict())


# -- the rewrite: codebook + packed indices in place of dense weights -------------------------


def _compress_graph(graph, quantized: dict[str, QuantizedTensor]) -> dict[str, int]:
    """Replace every initializer equal to a quantized tensor by its decoding subgraph."""
    from onnx import numpy_helper

    wanted = _by_value(quantized)
    builder = _Builder()
    kept, found = [], set()
    for init in graph.initializer:
        value = numpy_helper.to_array(init) if init.data_type == 1 else None
        match = wanted.get(_fingerprint(value)) if value is not None else None
        if match is None:
            kept.append(init)
            continue
        found.add(match[0])
        _decode(builder, init.name, *match[1:])
    missing = {key for key, *_ in wanted.values()} - found
    for key in sorted(missing):
        log.warning("%s: not found unchanged in the exported graph; it stays dense", key)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + builder.initializers)
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(builder.nodes + nodes)  # decoders first: nodes stay topologically sorted
    return {"compressed_tensors": len(found), "kept_dense_tensors": len(missing)}


def _by_value(quantized: dict[str, QuantizedTensor]) -> dict[tuple, tuple[str, np.ndarray, np.ndarray]]:
    """fingerprint of the dense values -> (key, centroids (k,) or (G, k), indices (shape))."""
    wanted = {}
    for key, qt in quantized.items():
        centroids = qt.centroids.detach().cpu().float().numpy()
        indices = qt.indices.detach().cpu().numpy()
        wanted.setdefault(_fingerprint(qt.dense().cpu().float().numpy()), (key, centroids, indices))
    return wanted


def _fingerprint(value: np.ndarray) -> tuple:
    value = np.ascontiguousarray(value, dtype=np.float32)
    return value.shape, value.tobytes()


class _Builder:
    """Collects new initializers (shared constants once) and nodes."""

    def __init__(self) -> None:
        self.initializers: list = []
        self.nodes: list = []
        self._constants: set[str] = set()

    def tensor(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        name = f"labelless::{name}"
        if name not in self._constants:
            self._constants.add(name)
            self.tensor(name, array)
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output


def _decode(b: _Builder, name: str, centroids: np.ndarray, indices: np.ndarray) -> None:
    """Nodes computing ``name = centroids[indices]`` from a codebook and packed indices."""
    k = centroids.shape[-1]
    codebook = b.tensor(f"{name}::codebook", centroids.astype(np.float32))  # (k,) or (G, k)
    shape = b.constant(f"shape_{'x'.join(map(str, indices.shape))}", np.array(indices.shape, np.int64))
    if centroids.size == 1:
        b.node("Expand", [codebook, shape], name)
        return
    if k == 1:
        flat = b.constant(f"zeros_{indices.size}", np.zeros(indices.size, np.int32))  # (n,)
    else:
        flat = _unpack(b, name, indices.reshape(-1), coding.index_bits(k))  # (n,) int32
    if centroids.ndim == 2:
        flat = _offset_by_channel(b, name, flat, centroids.shape, indices.shape[0])
        codebook = b.node("Reshape", [codebook, b.constant("flat", np.array([-1], np.int64))], f"{name}::table")
    gathered = b.node("Gather", [codebook, flat], f"{name}::values", axis=0)  # (n,)
    b.node("Reshape", [gathered, shape], name)


def _offset_by_channel(b: _Builder, name: str, flat: str, table: tuple[int, int], n_channels: int) -> str:
    """(n,) indices into one (G, k) codebook row each -> (n,) indices into the flattened table."""
    from .quantize import group_of_channel

    groups, k = table
    rows_shape = b.constant(f"rows_{n_channels}", np.array([n_channels, -1], np.int64))
    rows = b.node("Reshape", [flat, rows_shape], f"{name}::rows")  # (C, n / C)
    offsets = (group_of_channel(n_channels, groups).numpy() * k).astype(np.int32)[:, None]  # (C, 1)
    shifted = b.node("Add", [rows, b.tensor(f"{name}::offsets", offsets)], f"{name}::shifted_rows")
    return b.node("Reshape", [shifted, b.constant("flat", np.array([-1], np.int64))], f"{name}::offset_flat")


def _unpack(b: _Builder, name: str, indices: np.ndarray, bits: int) -> str:
    """Nodes turning ``<name>::indices`` (G, bits) uint8 back into (n,) int32 indices."""
    from onnx import TensorProto

    n_values = indices.size
    groups = -(-n_values // 8)
    packed = np.zeros(groups * bits, np.uint8)
    packed[: coding.packed_size(n_values, bits)] = coding.pack(indices, bits)
    data = b.tensor(f"{name}::indices", packed.reshape(groups, bits))  # 8 indices per row
    words = b.node("Cast", [data], f"{name}::bytes", to=TensorProto.UINT32)  # (G, bits)
    word = _gather_words(b, name, words, bits)  # (G, 8): each index's bytes, low byte first
    shifts = b.constant(f"shifts_{bits}", np.array([j * bits % 8 for j in range(8)], np.uint32))
    word = b.node("BitShift", [word, shifts], f"{name}::shifted", direction="RIGHT")
    mask = b.constant(f"mask_{bits}", np.array((1 << bits) - 1, np.uint32))
    word = b.node("BitwiseAnd", [word, mask], f"{name}::masked")  # (G, 8) indices
    flat = b.node("Reshape", [word, b.constant("flat", np.array([-1], np.int64))], f"{name}::flat")
    if groups * 8 != n_values:
        start = b.constant("zero", np.array([0], np.int64))
        end = b.constant(f"n_{n_values}", np.array([n_values], np.int64))
        flat = b.node("Slice", [flat, start, end], f"{name}::sliced")  # (n,)
    return b.node("Cast", [flat], f"{name}::int", to=TensorProto.INT32)


def _gather_words(b: _Builder, name: str, words: str, bits: int) -> str:
    """(G, 8) uint32: for index j of a block, the bytes its bits lie in, as one word."""
    span = max(math.ceil((j * bits % 8 + bits) / 8) for j in range(8))  # bytes an index touches
    word = None
    for t in range(span):
        # byte t of index j; past the block it is clamped: those bits are masked off later
        columns = np.array([min(j * bits // 8 + t, bits - 1) for j in range(8)], np.int64)
        part = b.node("Gather", [words, b.constant(f"bytes_{bits}_{t}", columns)], f"{name}::byte{t}", axis=1)
        if t:
            lift = b.constant(f"lift_{t}", np.array(8 * t, np.uint32))
            part = b.node("BitShift", [part, lift], f"{name}::lifted{t}", direction="LEFT")
            part = b.node("BitwiseOr", [word, part], f"{name}::word{t}")
        word = part
    return word
