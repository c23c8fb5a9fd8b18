"""Label-free retraining: frozen tensors stay frozen, no label is read, never worse, resumable."""

from __future__ import annotations

import copy
import dataclasses

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
    best = result.before if result.best_epoch == 0 else result.history[result.best_epoch - 1]
    assert result.after == {k: best[k] for k in result.after}  # the model handed back is the kept epoch's
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


# -- held-out selection: noise is not progress ---------------------------------------------------


def _evidence(hits, losses):
    from labelless.selection import Evidence

    return Evidence(torch.tensor(hits, dtype=torch.bool), torch.tensor(losses, dtype=torch.float32))


def test_a_gain_of_one_image_in_two_hundred_is_not_better():
    from labelless.selection import significantly_better

    old = _evidence([True] * 150 + [False] * 50, [0.5] * 200)
    new = _evidence([True] * 151 + [False] * 49, [0.5] * 200)
    assert not significantly_better(new, old)


def test_a_clear_gain_in_hits_is_better_and_a_loss_in_hits_never_is():
    from labelless.selection import significantly_better

    old = _evidence([True] * 100 + [False] * 100, [0.5] * 200)
    new = _evidence([True] * 130 + [False] * 70, [0.5] * 200)
    assert significantly_better(new, old) and not significantly_better(old, new)
    lower_loss_fewer_hits = _evidence([True] * 95 + [False] * 105, [0.1] * 200)
    assert not significantly_better(lower_loss_fewer_hits, old)


def test_the_same_hits_with_a_clearly_lower_loss_is_better_and_a_noisy_one_is_not():
    from labelless.selection import significantly_better

    generator = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=generator)
    hits = [True] * 120 + [False] * 80
    old = _evidence(hits, base.tolist())
    assert significantly_better(_evidence(hits, (base - 0.05).tolist()), old)
    noisy = base + 0.3 * (torch.rand(200, generator=generator) - 0.5)
    noisy[0] -= 0.2  # lower on average by a hair, far inside the noise
    assert not significantly_better(_evidence(hits, noisy.tolist()), old)


def test_too_few_held_out_images_keep_the_start_and_say_why(student, teacher, unlabeled):
    few = torch.utils.data.Subset(unlabeled, range(300))  # 30 held out at the default 10%
    result = retrain(copy.deepcopy(student), teacher, few, PRE, config=FAST)
    assert result.skipped and "only 30 image(s) are held out" in result.skipped and "--holdout" in result.skipped
    assert not result.history
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), student.state_dict().values()))
    enough = retrain(copy.deepcopy(student), teacher, few, PRE, config=dataclasses.replace(FAST, min_holdout=30))
    assert not enough.skipped and enough.history


def test_an_epoch_not_significantly_better_leaves_the_start_in_place(student, teacher, unlabeled, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["labelless.retrain"], "significantly_better", lambda new, old: False)
    result = retrain(copy.deepcopy(student), teacher, unlabeled, PRE, config=FAST)
    assert result.best_epoch == 0 and result.after == result.before and len(result.history) == FAST.epochs
