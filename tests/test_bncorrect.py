"""BatchNorm statistics correction: each layer then sees, relative to its statistics, what the
original's sees; codebooks, indices and other tensors do not move; no label is read."""

from __future__ import annotations

import copy

import torch
from conftest import Images
from torch import nn

import labelless
from labelless.bncorrect import correct_batchnorm


def _bn_input(model, x):
    seen = {}
    handle = model.bn.register_forward_pre_hook(lambda m, a: seen.setdefault("y", a[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["y"].transpose(0, 1).reshape(model.bn.num_features, -1)  # (C, N*H*W)


def _trained_like(tiny):
    with torch.no_grad():  # BatchNorm statistics that fit the original's activations
        tiny.bn.running_mean.normal_(0, 0.1)
        tiny.bn.running_var.uniform_(0.5, 2.0)
    return tiny


def test_each_batchnorm_sees_what_the_original_sees_relative_to_its_statistics(tiny):
    teacher = _trained_like(tiny)
    student = labelless.quantize(teacher, [{"layers": "*", "weights": 2}])
    images = Images(torch.randn(64, 1, 16, 16))
    before = {k: (qt.centroids.clone(), qt.indices.clone()) for k, qt in labelless.quantized_tensors(student).items()}
    assert correct_batchnorm(student, teacher, images, nn.Identity(), n_images=64) == 1
    x = torch.stack([images[i] for i in range(64)])
    y_teacher, y_student = _bn_input(teacher, x), _bn_input(student, x)
    shift_t = y_teacher.mean(1) - teacher.bn.running_mean
    shift_s = y_student.mean(1) - student.bn.running_mean
    assert torch.allclose(shift_s, shift_t, atol=1e-5)
    ratio_t = (y_teacher.var(1, unbiased=False) + 1e-5) / (teacher.bn.running_var + 1e-5)
    ratio_s = (y_student.var(1, unbiased=False) + 1e-5) / (student.bn.running_var + 1e-5)
    assert torch.allclose(ratio_s, ratio_t, rtol=1e-4)
    after = labelless.quantized_tensors(student)
    assert all(torch.equal(c, after[k].centroids) and torch.equal(i, after[k].indices) for k, (c, i) in before.items())


def test_an_unquantized_copy_is_left_unchanged_and_so_is_the_teacher(tiny):
    teacher = _trained_like(tiny)
    student = copy.deepcopy(teacher)
    saved = copy.deepcopy(teacher.state_dict())
    correct_batchnorm(student, teacher, Images(torch.randn(32, 1, 16, 16)), nn.Identity(), n_images=32)
    assert all(torch.allclose(v, student.state_dict()[k], atol=1e-6) for k, v in saved.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in saved.items())


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    assert correct_batchnorm(model, copy.deepcopy(model), Images(torch.randn(8, 16)), nn.Identity()) == 0
