"""The public API surface: what ``import labelless`` offers, pinned so a change is deliberate."""

from __future__ import annotations

import labelless

PUBLIC = {
    "DataError", "FileFormatError", "LabellessError", "LayerInfo", "LayerSetting", "ModelError", "ModelSpec", "Plan",
    "PlanError", "QuantizedTensor", "RetrainConfig", "RetrainResult", "Rule", "SweepConfig", "TensorChoice",
    "available_models", "build_model", "dequantize", "fisher_importance", "inspect", "kmeans1d", "list_layers",
    "load", "load_plan", "load_state_dict_file", "load_weights", "quantize", "quantized_tensors", "read",
    "retrain", "save", "search", "sse", "sweep", "CrossEntropy", "Distillation", "Objective", "Preprocess",
    "open_images", "Predictions", "predict", "export_onnx", "RunConfig", "run_pipeline",
}


def test_all_is_exactly_the_public_api_and_every_name_exists():
    assert set(labelless.__all__) == PUBLIC
    assert all(callable(getattr(labelless, name)) for name in PUBLIC)


def test_readme_names_are_importable():
    from labelless.data import Preprocess, open_images  # noqa: F401  (the README's Python example)
    from labelless.export import export_onnx  # noqa: F401
