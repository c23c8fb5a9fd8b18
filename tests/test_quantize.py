"""quantize(): at most k values per tensor, everything else untouched, plain forward."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import labelless
from labelless import PlanError, dequantize, quantize, quantized_tensors

PLAN = [{"layers": "*", "weights": 16, "bias": 1}]


def test_every_quantized_tensor_has_at_most_k_values(model):
    q = quantize(model, [{"layers": "*", "weights": 16, "bias": 1}, {"layers": "1", "weights": 4}])
    for key, qt in quantized_tensors(q).items():
        k = 4 if key == "conv1.weight" else 1 if key.endswith("bias") else 16
        assert qt.n_clusters <= k
        assert qt.dense().unique().numel() <= k
        assert getattr(qt.module, qt.name).unique().numel() <= k  # what forward uses


def test_untouched_parameters_stay_bit_identical(model):
    q = quantize(model, [{"layers": "2-5", "weights": 8}])
    quantized = set(quantized_tensors(q))
    assert quantized == {f"{l.name}.weight" for l in labelless.list_layers(model)[1:5]}
    original = model.state_dict()
    for key, value in q.state_dict().items():
        if not key.endswith(("_centroids", "_indices")):
            assert torch.equal(value, original[key]), key
    assert torch.equal(model.conv1.weight, original["conv1.weight"])  # the input model is not modified


def test_forward_is_plain_torch_on_the_decoded_weights(model, images):
    q = quantize(model, PLAN)
    dense = dequantize(q)
    assert not list(quantized_tensors(dense))
    assert all(isinstance(p, nn.Parameter) for p in dense.parameters())
    with torch.no_grad():
        assert torch.equal(q(images), dense(images))


def test_quantized_tensors_are_frozen_and_other_parameters_trainable(model):
    q = quantize(model, [{"layers": "1-20", "weights": 8}])
    trainable = {name for name, p in q.named_parameters() if p.requires_grad}
    assert "fc.weight" in trainable and "bn1.weight" in trainable
    assert not any(name.endswith("_centroids") for name in trainable)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(4, 6, 3), (2, 4, 10)),
        (nn.Conv3d(2, 4, 3), (1, 2, 5, 5, 5)),
        (nn.ConvTranspose2d(4, 3, 3, stride=2), (2, 4, 6, 6)),
        (nn.Conv2d(8, 8, 3, groups=8), (2, 8, 7, 7)),
        (nn.Conv2d(8, 16, 3, groups=4), (2, 8, 7, 7)),
        (nn.Linear(20, 5), (3, 20)),
    ],
)
def test_all_conv_and_linear_kinds_quantize(layer, shape):
    model = nn.Sequential(layer).eval()
    q = quantize(model, [{"layers": "*", "weights": 4, "bias": 2}])
    x = torch.randn(shape)
    assert q[0].weight.unique().numel() <= 4 and q[0].bias.unique().numel() <= 2
    with torch.no_grad():
        assert q(x).shape == model(x).shape


def test_shared_parameter_is_quantized_once_and_stays_shared():
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    q = quantize(model, [{"layers": "1", "weights": 4}])
    assert q[0].weight_centroids is q[2].weight_centroids
    assert torch.equal(q[0].weight, q[2].weight)
    with pytest.raises(PlanError, match="same tensor"):
        quantize(model, [{"layers": "1", "weights": 4}, {"layers": "2", "weights": 8}])


def test_more_centroids_than_weights_is_clamped_with_a_warning(caplog):
    model = nn.Sequential(nn.Linear(2, 3))
    with caplog.at_level(logging.WARNING, logger="labelless"):
        q = quantize(model, [{"layers": "*", "weights": 64}])
    assert quantized_tensors(q)["0.weight"].n_clusters <= 6
    assert "only 6 values" in caplog.text


def test_plan_errors_name_what_is_valid(model):
    with pytest.raises(PlanError, match="BatchNorm2d, which labelless cannot quantize"):
        quantize(model, [{"layers": "bn1", "weights": 4}])
    with pytest.raises(PlanError, match="no quantizable layer"):
        quantize(nn.Sequential(nn.ReLU()), PLAN)


def test_retrained_centroids_change_the_weights_and_keep_k_values(tiny):
    q = quantize(tiny, [{"layers": "*", "weights": 4}])
    centroids = q.fc1.weight_centroids
    centroids.requires_grad_(True)
    loss = q(torch.randn(2, 1, 8, 8)).square().mean()
    loss.backward()
    assert centroids.grad is not None and centroids.grad.abs().sum() > 0
    with torch.no_grad():
        centroids -= 0.1 * centroids.grad
        q(torch.randn(1, 1, 8, 8))
    assert torch.equal(q.fc1.weight, centroids.detach()[q.fc1.weight_indices.long()])
