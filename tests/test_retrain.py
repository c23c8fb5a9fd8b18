"""Label-free retraining: frozen tensors stay frozen, no label is read, never worse, resumable."""

from __future__ import annotations

import copy

import pytest
import torch

import labelless
from labelless import LabellessError
from labelless.data import Preprocess, open_images
from labelless.retrain import CrossEntropy, RetrainConfig, _Trainer, retrain

PRE = Preprocess(channels=1, size=8, mean=(0.3,), std=(0.3,))
FAST = RetrainConfig(epochs=3, lr=3e-3, batch_size=64, cutmix=0.5, seed=1)


@pytest.fixture(scope="module")
def teacher():
    from conftest import TinyNet
    from labelless.train import TrainConfig, train_classifier

    torch.manual_seed(0)
    model = TinyNet()
    train_classifier(model, open_images("digits", labeled=True), PRE,
                     config=TrainConfig(epochs=3, lr=1e-2, batch_size=64, augment=False))
    return model.eval()


@pytest.fixture
def student(teacher):
    return labelless.quantize(teacher, [{"layers": "conv,fc1", "weights": 2}])


@pytest.fixture(scope="module")
def unlabeled():
    return open_images("digits", split="train").unlabeled()


class NoLabels(torch.utils.data.Dataset):
    """Images only; any attempt to reach a label raises."""

    def __init__(self, base):
        self.images = base.images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    @property
    def labels(self):
        raise AssertionError("the label-free path read a label")


def _snapshot(model):
    return {k: (qt.centroids.detach().clone(), qt.indices.clone()) for k, qt in labelless.quantized_tensors(model).items()}


def test_quantized_tensors_stay_bit_identical_and_no_label_is_read(student, teacher, unlabeled):
    before = _snapshot(student)
    result = retrain(student, teacher, NoLabels(unlabeled), PRE, config=FAST)
    for key, (centroids, indices) in _snapshot(result.model).items():
        assert torch.equal(centroids, before[key][0]) and torch.equal(indices, before[key][1])
    assert result.after["agreement"] >= result.before["agreement"]
    assert result.trainable_parameters > 0


def test_retraining_improves_agreement_and_the_loss_falls(student, teacher, unlabeled):
    result = retrain(student, teacher, unlabeled, PRE, config=RetrainConfig(epochs=4, lr=3e-3, batch_size=64, cutmix=0))
    assert result.after["agreement"] > result.before["agreement"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_never_hands_back_a_worse_model(student, teacher, unlabeled):
    wild = RetrainConfig(epochs=2, lr=5.0, batch_size=64, cutmix=0)  # a learning rate that wrecks it
    result = retrain(student, teacher, unlabeled, PRE, config=wild)
    assert result.after == result.before and result.best_epoch == 0


def test_batchnorm_statistics_frozen_by_default_and_updated_on_request(student, teacher, unlabeled):
    mean = student.bn.running_mean.clone()
    frozen = retrain(copy.deepcopy(student), teacher, unlabeled, PRE, config=FAST)
    assert torch.equal(frozen.model.bn.running_mean, mean)
    updated = retrain(copy.deepcopy(student), teacher, unlabeled, PRE,
                      config=RetrainConfig(epochs=3, lr=3e-3, batch_size=64, bn="update", cutmix=0))
    assert updated.best_epoch > 0 and not torch.equal(updated.model.bn.running_mean, mean)


def test_tune_centroids_moves_codebooks_not_indices_nor_size(tmp_path, student, teacher, unlabeled):
    before = _snapshot(student)
    size = labelless.save(student, tmp_path / "a.lless")["total_bytes"]
    result = retrain(student, teacher, unlabeled, PRE,
                     config=RetrainConfig(epochs=3, lr=3e-3, batch_size=64, tune_centroids=True, centroid_lr=1e-2, cutmix=0))
    after = _snapshot(result.model)
    assert all(torch.equal(after[k][1], before[k][1]) for k in before)
    assert result.best_epoch > 0 and any(not torch.equal(after[k][0], before[k][0]) for k in before)
    assert labelless.save(result.model, tmp_path / "b.lless")["total_bytes"] == size


def test_a_killed_retraining_resumes_to_the_same_result(tmp_path, student, teacher, unlabeled, monkeypatch):
    reference = retrain(copy.deepcopy(student), teacher, unlabeled, PRE, config=FAST, checkpoint_dir=tmp_path / "a")
    real = _Trainer._epoch

    def dies_in_epoch_2(self, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(self, epoch, *args)

    monkeypatch.setattr(_Trainer, "_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        retrain(copy.deepcopy(student), teacher, unlabeled, PRE, config=FAST, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(_Trainer, "_epoch", real)
    resumed = retrain(copy.deepcopy(student), teacher, unlabeled, PRE, config=FAST, checkpoint_dir=tmp_path / "b")
    assert resumed.history == reference.history and resumed.after == reference.after
    for (k, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("change", ["normalisation", "images"])
def test_a_finished_checkpoint_is_not_reused_for_other_data_or_normalisation(tmp_path, student, teacher, unlabeled,
                                                                            change):
    first = retrain(copy.deepcopy(student), teacher, unlabeled, PRE, config=FAST, checkpoint_dir=tmp_path)
    pre, data = PRE, unlabeled
    if change == "normalisation":
        pre = Preprocess(channels=1, size=8, mean=(0.5,), std=(0.2,))
    else:
        data = torch.utils.data.Subset(unlabeled, list(range(len(unlabeled) - 1, -1, -1)))  # same images, reversed
    fresh = retrain(copy.deepcopy(student), teacher, data, pre, config=FAST, checkpoint_dir=tmp_path / "fresh")
    again = retrain(copy.deepcopy(student), teacher, data, pre, config=FAST, checkpoint_dir=tmp_path)
    assert again.history == fresh.history != first.history  # started afresh, not resumed from `first`


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, student, teacher, unlabeled, monkeypatch):
    real = _Trainer._step
    calls = {"n": 0}

    def nan_in_epoch_2(self, *args):
        calls["n"] += 1
        return float("nan") if calls["n"] > 30 else real(self, *args)

    monkeypatch.setattr(_Trainer, "_step", nan_in_epoch_2)
    with pytest.raises(LabellessError, match="loss became nan.*checkpoint is kept"):
        retrain(student, teacher, unlabeled, PRE, config=FAST, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "retrain-labelfree.ckpt", weights_only=True)
    assert saved["epoch"] >= 1


@pytest.mark.parametrize("objective", ["teacher", "labels"])
def test_nothing_left_to_retrain_hands_the_model_back_unchanged_and_says_why(objective, unlabeled, caplog):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    everything = labelless.quantize(net, [{"layers": "*", "weights": 4, "bias": 2}])
    data = open_images("digits", labeled=True) if objective == "labels" else unlabeled
    before = _snapshot(everything)
    result = retrain(everything, CrossEntropy() if objective == "labels" else net, data, PRE, config=FAST)
    assert result.model is everything and result.skipped and result.best_epoch == 0 and not result.history
    assert all(torch.equal(a[0], before[k][0]) and torch.equal(a[1], before[k][1])
               for k, a in _snapshot(result.model).items())
    assert "nothing is left to retrain" in caplog.text


def test_labelled_baseline_trains_with_cross_entropy_and_no_teacher(student):
    labeled = open_images("digits", split="train", labeled=True)
    result = retrain(student, CrossEntropy(), labeled, PRE, config=RetrainConfig(epochs=3, lr=3e-3, batch_size=64))
    assert CrossEntropy().teacher is None
    assert result.best_epoch > 0 and result.after["accuracy"] > result.before["accuracy"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert set(result.after) == {"accuracy"} and result.images_per_second > 0


def test_a_teacher_or_an_objective_and_nothing_else(student, unlabeled):
    with pytest.raises(TypeError, match="teacher nn.Module or an Objective"):
        retrain(student, "teacher.pt", unlabeled, PRE, config=FAST)


def test_feature_matching_keeps_frozen_tensors_and_brings_layer_outputs_closer(student, teacher, unlabeled):
    from labelless.features import FeatureTaps, feature_loss, tap_names

    before = _snapshot(student)
    names = tap_names(teacher)
    assert names == ["conv", "depthwise", "fc1"]  # every Conv/Linear but the logits

    def layer_error(model):
        x = PRE(unlabeled.images[:256])
        with FeatureTaps(model, names) as s, FeatureTaps(teacher, names) as t, torch.no_grad():
            model(x), teacher(x)
            return float(feature_loss(s.outputs, t.outputs))

    start = layer_error(student)
    config = RetrainConfig(epochs=3, lr=3e-3, batch_size=64, cutmix=0.0, seed=1, features=1.0)
    result = retrain(student, teacher, NoLabels(unlabeled), PRE, config=config)
    after = _snapshot(result.model)
    assert all(torch.equal(before[k][0], after[k][0]) and torch.equal(before[k][1], after[k][1]) for k in before)
    assert result.best_epoch > 0 and layer_error(result.model) < start
    assert not teacher._forward_hooks and not any(m._forward_hooks for m in result.model.modules())  # taps removed


def test_negative_feature_weight_is_rejected():
    with pytest.raises(LabellessError, match="features"):
        RetrainConfig(features=-1.0)


def test_a_teacher_that_calls_most_images_one_class_is_warned_about(teacher, caplog):
    from labelless.evaluate import warn_if_collapsed

    balanced = torch.eye(10).repeat(5, 1)  # 50 images, 5 per class
    assert warn_if_collapsed(balanced) == pytest.approx(0.1) and "says little" not in caplog.text
    collapsed = torch.cat([balanced, torch.eye(10)[:1].repeat(60, 1)])  # 65 of 110 images in class 0
    assert warn_if_collapsed(collapsed, "the digits") == pytest.approx(65 / 110)
    assert "calls 59% of the digits class 0 (10 of 10 classes used)" in caplog.text
