"""Error compensation (GPTQ over k-means codebooks): only indices move, each stays a valid
centroid, the layer's output error falls below nearest rounding's, and no label is read."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import Images
from torch import nn

import labelless
from labelless.compensate import _patches, compensate, gptq_indices, input_hessian
from labelless.quantize import decode


def _correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Samples of one fixed correlated distribution (its mixing matrix does not depend on ``seed``)."""
    spectrum = torch.logspace(0, -2, dim)[:, None]  # a wide spectrum, as real activations have
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)) * spectrum
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) @ mixing


def _output_error(weight: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (weight - dense).T) ** 2).mean().item()


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_compensated_indices_beat_nearest_rounding_on_the_layer_output(granularity):
    layer = nn.Linear(48, 24, bias=False)
    rule = {"layers": "*", "weights": 4, "granularity": granularity, "group_size": 6}
    nearest = labelless.quantize(layer, [rule])
    qt = labelless.quantized_tensors(nearest)["weight"]
    calibration, held_out = _correlated(2048, 48, seed=1), _correlated(2048, 48, seed=2)
    hessian = 2 * calibration.double().T @ calibration.double() / len(calibration)
    indices = gptq_indices(layer.weight.detach(), qt, hessian)
    assert indices.shape == layer.weight.shape and int(indices.max()) < 4 and int(indices.min()) >= 0
    before = _output_error(layer.weight.detach(), qt.dense(), held_out)
    after = _output_error(layer.weight.detach(), decode(qt.centroids.detach(), indices), held_out)
    assert after < 0.5 * before  # measured: 0.24 of nearest rounding's error


def test_compensate_moves_only_indices_and_brings_the_outputs_closer(tiny):
    torch.manual_seed(0)
    images = (torch.rand(256, 1, 8, 8) * 255).to(torch.uint8)
    preprocess = labelless.Preprocess(channels=1, size=8, mean=(0.5,), std=(0.25,))
    student = labelless.quantize(tiny, [{"layers": "*", "weights": 2}])
    before = {k: (qt.centroids.detach().clone(), qt.indices.clone()) for k, qt in
              labelless.quantized_tensors(student).items()}
    x = preprocess(images)
    kl_before = _kl(tiny, student, x)
    changed = compensate(student, tiny, Images(images), preprocess, n_images=256)
    after = labelless.quantized_tensors(student)
    assert changed == 4  # conv, depthwise (one Hessian per channel), fc1, fc2
    for key, (centroids, indices) in before.items():
        assert torch.equal(after[key].centroids, centroids)
        assert after[key].indices.dtype == indices.dtype and int(after[key].indices.max()) < 2
    moved = ("depthwise.weight", "fc1.weight", "fc2.weight")  # conv reads patches of i.i.d. noise: nothing to gain
    assert all(not torch.equal(after[k].indices, before[k][1]) for k in moved)
    assert _kl(tiny, student, x) < kl_before


def test_layers_wider_than_max_columns_keep_nearest_indices(tiny, caplog):
    images = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    preprocess = labelless.Preprocess(channels=1, size=8, mean=(0.5,), std=(0.25,))
    student = labelless.quantize(tiny, [{"layers": "*", "weights": 2}])
    nearest = labelless.quantized_tensors(student)["fc1.weight"].indices.clone()
    with caplog.at_level("INFO", logger="labelless.compensate"):
        changed = compensate(student, tiny, Images(images), preprocess, n_images=64, max_columns=100)
    assert changed == 3  # fc1 reads 128 inputs
    assert torch.equal(labelless.quantized_tensors(student)["fc1.weight"].indices, nearest)
    assert "fc1 read more than 100 inputs" in caplog.text


def _kl(teacher, student, x):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                        reduction="batchmean").item()


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2, dilation=2, padding=2),
    nn.Conv2d(3, 5, 3, padding="same"), nn.Conv2d(3, 5, (3, 2), padding=(1, 2), padding_mode="reflect"),
])
def test_patches_times_the_flat_weight_is_the_convolution(conv):
    x = torch.randn(2, 3, 9, 9)
    rows = _patches(conv, x)  # (n * L, in_features)
    out = conv(x) - conv.bias[None, :, None, None]
    assert torch.allclose(rows @ conv.weight.reshape(5, -1).T, out.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-5)


def testinput_hessian_is_that_of_the_inputs_the_layer_receives():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(50, 6)
    inputs = torch.relu(model[0](x)).double()
    with torch.no_grad():
        hessian = input_hessian(model, model[2], x, batch_size=16)
    assert hessian.shape == (1, 4, 4) and torch.allclose(hessian[0], 2 * inputs.T @ inputs / 50)


def test_a_grouped_convolution_gets_one_hessian_per_group_and_compensates_better():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
    mixing = torch.randn(4, 4) + 2 * torch.eye(4)  # channels that correlate, and smooth in space as images are
    calibration, held_out = (F.avg_pool2d(torch.einsum("nchw,cd->ndhw", torch.randn(256, 4, 8, 8), mixing), 3, 1)
                             for _ in range(2))
    with torch.no_grad():
        hessian = input_hessian(conv, conv, calibration, batch_size=64)
    rows = _patches(conv, calibration).reshape(-1, 2, 18).double()  # group g reads channels 2g, 2g+1
    assert hessian.shape == (2, 18, 18)
    assert torch.allclose(hessian[1], 2 * rows[:, 1].T @ rows[:, 1] / rows.shape[0])
    qt = labelless.quantized_tensors(labelless.quantize(conv, [{"layers": "*", "weights": 4}]))["weight"]
    indices = gptq_indices(conv.weight.detach(), qt, hessian)
    with torch.no_grad():
        def error(dense):
            return ((F.conv2d(held_out, conv.weight - dense, padding=1, groups=2)) ** 2).mean().item()

        assert error(decode(qt.centroids.detach(), indices)) < 0.8 * error(qt.dense())  # measured: 0.74


def test_compensation_leaves_the_teacher_untouched(tiny):
    teacher = copy.deepcopy(tiny)
    images = (torch.rand(64, 1, 8, 8) * 255).to(torch.uint8)
    preprocess = labelless.Preprocess(channels=1, size=8, mean=(0.5,), std=(0.25,))
    compensate(labelless.quantize(tiny, [{"layers": "*", "weights": 4}]), tiny, Images(images), preprocess)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), teacher.state_dict().values()))


def test_the_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse_hessian():
    from labelless.compensate import _inverse_factor

    a = torch.randn(3, 12, 40, dtype=torch.float64)
    hessian = a @ a.transpose(1, 2)
    upper = _inverse_factor(hessian, damp=0.01)
    damped = hessian + 0.01 * torch.diagonal(hessian, dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(12)
    assert torch.allclose(upper, torch.triu(upper)) and (torch.diagonal(upper, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(upper.transpose(1, 2) @ upper, torch.linalg.inv(damped), rtol=1e-6, atol=1e-8)
