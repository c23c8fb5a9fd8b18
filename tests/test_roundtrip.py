"""One small model of each torchvision family through the whole chain (bench/zoo.py runs all 80):
quantize, save, load and decompress give exactly the saved model's outputs, and ONNX Runtime's
outputs of the compressed graph match them."""

from __future__ import annotations

import importlib.util

import pytest

from labelless.models import available_models
from labelless.roundtrip import round_trip, smallest_input

FAMILIES = ["squeezenet1_1", "mnasnet0_5", "regnet_x_400mf", "googlenet", "shufflenet_v2_x0_5", "mobilenet_v3_small",
            "efficientnet_b0", "densenet121", "alexnet"]
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")


def test_the_families_named_are_torchvision_classifiers():
    assert set(FAMILIES) <= set(available_models())


@needs_onnx
@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_of_each_family_survives_the_whole_chain(name, tmp_path):
    steps = round_trip(smallest_input(name), tmp_path)
    assert steps["lless_bytes"] < steps["fp32_bytes"] / 4  # 4-bit weights, 0-bit biases
    assert steps["onnx_max_error"] < 1e-3


def test_the_smallest_input_is_the_smallest_the_network_takes():
    assert smallest_input("resnet18").image_size == 32
    assert smallest_input("vit_b_32").image_size == 224  # ViT fixes its input size
