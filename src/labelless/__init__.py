"""labelless: compress trained PyTorch models with per-layer k-means weight sharing, then win
their accuracy back by retraining without labels.

Example:
    >>> import labelless
    >>> model = labelless.build_model(labelless.ModelSpec("resnet18", num_classes=10))
    >>> q = labelless.quantize(model, [{"layers": "*", "weights": 16, "bias": 1}])
    >>> report = labelless.save(q, "model.lless")
    >>> restored = labelless.load("model.lless")
"""

from __future__ import annotations

import logging

from .data import Preprocess, open_images
from .errors import DataError, FileFormatError, LabellessError, ModelError, PlanError
from .evaluate import Predictions, predict
from .export import export_onnx
from .fileformat import inspect, load, read, save
from .importance import fisher_importance
from .kmeans import kmeans1d, sse
from .layers import LayerInfo, list_layers
from .models import ModelSpec, available_models, build_model, load_state_dict_file, load_weights
from .objectives import CrossEntropy, Distillation, Objective
from .pipeline import run_pipeline
from .plan import LayerSetting, Plan, Rule, TensorChoice, load_plan
from .quantize import QuantizedTensor, dequantize, quantize, quantized_tensors
from .retrain import RetrainConfig, RetrainResult, retrain
from .runconfig import RunConfig
from .search import search
from .sensitivity import SweepConfig, sweep

__version__ = "0.1.0"

__all__ = [
    "CrossEntropy",
    "DataError",
    "Distillation",
    "FileFormatError",
    "LabellessError",
    "LayerInfo",
    "LayerSetting",
    "ModelError",
    "ModelSpec",
    "Objective",
    "Plan",
    "PlanError",
    "Predictions",
    "Preprocess",
    "QuantizedTensor",
    "RetrainConfig",
    "RetrainResult",
    "Rule",
    "RunConfig",
    "SweepConfig",
    "TensorChoice",
    "available_models",
    "build_model",
    "dequantize",
    "export_onnx",
    "fisher_importance",
    "inspect",
    "kmeans1d",
    "list_layers",
    "load",
    "load_plan",
    "load_state_dict_file",
    "load_weights",
    "open_images",
    "predict",
    "quantize",
    "quantized_tensors",
    "read",
    "retrain",
    "run_pipeline",
    "save",
    "search",
    "sse",
    "sweep",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
