"""The whole chain for one architecture: quantize, save, load, decompress, export, run the ONNX graph.

:func:`round_trip` is what ``tests/test_roundtrip.py`` runs for one model of each torchvision
family and ``bench/zoo.py`` for every classifier torchvision ships; each step's outcome is
checked, not only that it ran.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .fileformat import load, save
from .models import ModelSpec, build_model
from .quantize import dequantize, quantize

__all__ = ["round_trip", "smallest_input"]

PLAN = [{"layers": "*", "weights": 16, "bias": 1}]
SIZES = (32, 64, 96, 128, 224)


def smallest_input(name: str, num_classes: int = 10) -> ModelSpec:
    """The spec of ``name`` at the smallest of :data:`SIZES` its pooling accepts."""
    for size in SIZES:
        spec = ModelSpec(name, num_classes=num_classes, image_size=size)
        try:
            _meta_forward(spec)
        except Exception:  # noqa: BLE001 - too small for this network: try the next size
            continue
        return spec
    return ModelSpec(name, num_classes=num_classes)


def _meta_forward(spec: ModelSpec) -> None:
    with torch.no_grad():
        build_model(spec, device="meta").eval()(spec.example_input(device="meta"))


def round_trip(spec: ModelSpec, folder: str | Path | None = None, *, onnx: bool = True) -> dict[str, Any]:
    """Each step's seconds and checks; raises AssertionError naming the first step that fails."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(folder or tmp)
        torch.manual_seed(0)
        steps: dict[str, Any] = {"model": spec.name, "image_size": spec.image_size}
        model = _timed(steps, "build", lambda: build_model(spec).eval())
        x = torch.rand(2, spec.in_channels, spec.image_size, spec.image_size)
        quantized = _timed(steps, "quantize", lambda: quantize(model, PLAN))
        report = _timed(steps, "save", lambda: save(quantized, folder / "m.lless", entropy="none"))
        back = _timed(steps, "load", lambda: load(folder / "m.lless"))
        with torch.no_grad():
            expected = quantized(x)
            assert torch.equal(back(x), expected), "load: outputs differ from the saved model's"
            assert torch.equal(dequantize(back)(x), expected), "decompress: dense outputs differ"
        steps.update(lless_bytes=report["total_bytes"], fp32_bytes=report["fp32_bytes"])
        if onnx:
            steps["onnx_max_error"] = _timed(steps, "export", lambda: _onnx_error(folder, x, expected))
        return steps


def _timed(steps: dict, name: str, work):
    start = time.perf_counter()
    try:
        result = work()
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    steps[f"{name}_seconds"] = round(time.perf_counter() - start, 3)
    return result


def _onnx_error(folder: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    import onnxruntime as ort

    from .export import export_onnx

    export_onnx(folder / "m.lless", folder / "m.onnx")
    session = ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
    assert error < 1e-3, f"export: ONNX Runtime's outputs differ by {error:.2e} (relative)"
    return error
