"""Label-free importance (diagonal Fisher of the model's own predictions) and the weighted
k-means it drives: the estimate is right, no label is read, and the clustering stays exact
under the weighted objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import labelless
from labelless.errors import LabellessError, PlanError
from labelless.importance import fisher_importance, load_importance, save_importance
from labelless.quantize import cluster_tensor

try:
    import ckwrap
except ImportError:  # pragma: no cover - a dev dependency
    ckwrap = None


class Images(torch.utils.data.Dataset):
    """Float images, optionally with labels that must never matter."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


def softmax_regression(d: int = 6, classes: int = 4) -> nn.Module:
    model = nn.Sequential(nn.Linear(d, classes))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.8)
        model[0].bias.normal_(0, 0.5)
    return model.eval()


def test_fisher_of_softmax_regression_matches_the_closed_form():
    # For logits W x + b the Fisher diagonal is E_x[p_j (1 - p_j) x_d^2] (and p_j (1 - p_j) for b_j)
    model, x = softmax_regression(), torch.randn(4000, 6)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    expected_w = ((p * (1 - p)).T @ (x * x)) / len(x)  # (classes, d)
    expected_b = (p * (1 - p)).mean(0)
    for batch_size in (1, 16):
        scores = fisher_importance(model, Images(x), nn.Identity(), n_images=4000, batch_size=batch_size, seed=1)
        w, b = scores["0.weight"].double(), scores["0.bias"].double()
        assert (w - expected_w).abs().sum() / expected_w.sum() < 0.1, batch_size
        assert (b - expected_b).abs().sum() / expected_b.sum() < 0.1, batch_size


def test_labels_in_the_dataset_are_never_read():
    model, x = softmax_regression(), torch.randn(64, 6)
    plain = fisher_importance(model, Images(x), nn.Identity(), n_images=64, seed=3)
    for labels in (torch.zeros(64, dtype=torch.long), torch.randint(0, 4, (64,))):
        labelled = fisher_importance(model, Images(x, labels), nn.Identity(), n_images=64, seed=3)
        assert all(torch.equal(plain[k], labelled[k]) for k in plain)


def test_the_model_is_left_as_it_was(tiny):
    tiny.train()
    tiny.fc2.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    scores = fisher_importance(tiny, Images(torch.randn(16, 1, 16, 16)), nn.Identity(), n_images=16)
    assert tiny.training and not tiny.fc2.weight.requires_grad
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())  # BN statistics too
    assert set(scores) == {"conv.weight", "conv.bias", "depthwise.weight", "fc1.weight", "fc1.bias",
                           "fc2.weight", "fc2.bias"}
    assert all(s.shape == tiny.get_parameter(k).shape and (s >= 0).all() for k, s in scores.items())


def test_importance_round_trips_through_its_file(tmp_path, tiny):
    scores = fisher_importance(tiny, Images(torch.randn(8, 1, 16, 16)), nn.Identity(), n_images=8)
    save_importance(scores, tmp_path / "imp.safetensors")
    back = load_importance(tmp_path / "imp.safetensors")
    assert all(torch.equal(scores[k], back[k]) for k in scores)
    assert load_importance(tmp_path / "missing.safetensors") is None


@pytest.mark.parametrize("n_images, batch_size", [(0, 8), (8, 0)])
def test_bad_sizes_are_rejected(tiny, n_images, batch_size):
    with pytest.raises(LabellessError, match="n_images >= 1 and batch_size >= 1"):
        fisher_importance(tiny, Images(torch.randn(8, 1, 16, 16)), nn.Identity(), n_images=n_images,
                          batch_size=batch_size)


def test_importance_weighted_quantization_is_faithful_where_the_importance_is(tiny):
    # the largest tenth of a layer's weights, alone important, is reproduced far better than by plain k-means
    weights = tiny.fc1.weight.detach()
    important = weights > weights.quantile(0.9)
    importance = important.float()
    plain = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}])
    weighted = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}], importance={"fc1.weight": importance})

    def error(q):
        return float(((q.fc1.weight - weights)[important] ** 2).sum())

    assert error(weighted) < 0.5 * error(plain)
    assert weighted.fc1.weight.unique().numel() <= 4


def test_plan_can_turn_importance_off_per_layer(tiny):
    importance = {"fc1.weight": torch.rand_like(tiny.fc1.weight)}
    off = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4, "importance": False}], importance=importance)
    plain = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}])
    assert torch.equal(off.fc1.weight, plain.fc1.weight)


def test_importance_of_the_wrong_shape_is_a_clear_error(tiny):
    with pytest.raises(PlanError, match="importance for fc1.weight has shape"):
        labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}], importance={"fc1.weight": torch.ones(3)})


def test_all_zero_importance_falls_back_to_plain_kmeans(tiny):
    importance = {"fc1.weight": torch.zeros_like(tiny.fc1.weight)}
    zero = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}], importance=importance)
    plain = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}])
    assert torch.equal(zero.fc1.weight, plain.fc1.weight)


def _real_layer_and_importance(name: str):
    """A ResNet-18 layer and its Fisher importance on seeded images (fixed, not hand-made)."""
    torch.manual_seed(0)
    spec = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=28)
    model = labelless.build_model(spec).eval()
    scores = fisher_importance(model, Images(torch.randn(32, 1, 28, 28)), nn.Identity(), n_images=32)
    return model.get_parameter(name).detach(), scores[name]


@pytest.mark.skipif(ckwrap is None, reason="ckwrap (the exact reference) is not installed")
@pytest.mark.parametrize("name, k", [("layer1.0.conv1.weight", 4), ("layer1.0.conv1.weight", 16),
                                     ("layer3.0.conv2.weight", 4)])
def test_weighted_kmeans_on_real_fisher_is_within_a_tenth_of_a_percent_of_optimal(name, k):
    values, importance = _real_layer_and_importance(name)  # 36,864 values (exact path) / 589,824 (bucketed)
    centroids, indices = cluster_tensor(values, k, importance)
    weights = importance.double() + 1e-3 * importance.double().mean()  # the floor quantize adds
    x, w = values.double().flatten().numpy(), weights.flatten().numpy()
    ours = float((w * (x - centroids.double().numpy()[indices.long().flatten().numpy()]) ** 2).sum())
    exact = ckwrap.ckmeans(x, k, weights=w)
    optimum = float((w * (x - exact.centers[exact.labels]) ** 2).sum())
    assert ours <= optimum * 1.001, ours / optimum
    assert np.unique(centroids.numpy()).size <= k
