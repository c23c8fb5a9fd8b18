"""Refining unlabelled images toward the teacher's BatchNorm statistics (labelless.refine)."""

from __future__ import annotations

import copy

import pytest
import torch

import labelless
from labelless import LabellessError
from labelless.data import Preprocess, open_images
from labelless.refine import bn_statistics_loss, cached_refine, refine_images
from labelless.retrain import RetrainConfig, retrain

PRE = Preprocess(channels=1, size=8, mean=(0.3,), std=(0.3,))


@pytest.fixture(scope="module")
def teacher():
    """A TinyNet whose BatchNorm statistics come from smooth blobs, not from digits."""
    from conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().train()
    model.bn.momentum = None  # a plain average: the statistics of all the blobs
    blobs = torch.nn.functional.avg_pool2d(torch.rand(512, 1, 8, 8), 3, 1, 1) * 0.6
    with torch.no_grad():
        for batch in ((blobs - 0.3) / 0.3).split(64):
            model(batch)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return open_images("digits", split="train", limit=128).unlabeled()


def _loss(teacher, images: torch.Tensor) -> float:
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        return float(bn_statistics_loss(teacher, bns, PRE(images)))


def test_refined_images_match_the_teachers_statistics_better_and_keep_their_form(teacher, digits):
    before_state = copy.deepcopy(teacher.state_dict())
    refined = refine_images(teacher, digits, PRE, steps=30, batch_size=64)
    assert refined.images.dtype == torch.uint8 and refined.images.shape == digits.images.shape
    assert _loss(teacher, refined.images) < 0.1 * _loss(teacher, digits.images)
    for key, value in teacher.state_dict().items():  # the teacher is left as it was
        assert torch.equal(value, before_state[key]), key
    assert all(p.requires_grad for p in teacher.parameters())


def test_zero_steps_change_nothing_but_rounding(teacher, digits):
    refined = refine_images(teacher, digits, PRE, steps=0)
    assert (refined.images.int() - digits.images.int()).abs().max() <= 1


def test_a_teacher_without_batchnorm_is_a_clear_error(digits):
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    plain(torch.zeros(1, 1, 8, 8))
    with pytest.raises(LabellessError, match="no BatchNorm|none"):
        refine_images(plain, digits, PRE, steps=5)


def test_retrain_with_refinement_keeps_quantized_tensors_frozen(teacher, digits):
    student = labelless.quantize(teacher, [{"layers": "conv,fc1", "weights": 2}])
    frozen = {k: qt.indices.clone() for k, qt in labelless.quantized_tensors(student).items()}
    config = RetrainConfig(epochs=1, batch_size=32, refine_steps=5, seed=0)
    result = retrain(student, teacher, digits, PRE, config=config)
    for key, qt in labelless.quantized_tensors(result.model).items():
        assert torch.equal(qt.indices, frozen[key]), key


def test_negative_refine_steps_are_refused():
    with pytest.raises(LabellessError, match="refine_steps"):
        RetrainConfig(refine_steps=-1)


def test_cached_refine_reads_back_the_same_pixels_and_keys_on_what_they_depend_on(teacher, digits, tmp_path,
                                                                                   monkeypatch):
    first = cached_refine(teacher, digits, PRE, 5, tmp_path)
    assert torch.equal(first.images, refine_images(teacher, digits, PRE, 5).images)
    (path,) = tmp_path.glob("*.safetensors")
    calls = []
    monkeypatch.setattr("labelless.refine.refine_images", lambda *a, **k: calls.append(a) or first)
    again = cached_refine(teacher, digits, PRE, 5, tmp_path)
    assert torch.equal(again.images, first.images) and not calls  # read back, not refined again
    cached_refine(teacher, digits, PRE, 6, tmp_path)  # other steps: refined, kept apart
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.bn.running_mean += 0.1
    cached_refine(other, digits, PRE, 5, tmp_path)  # other teacher weights: refined again
    assert len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_damaged_refined_file_is_refined_again(teacher, digits, tmp_path, caplog):
    first = cached_refine(teacher, digits, PRE, 5, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    again = cached_refine(teacher, digits, PRE, 5, tmp_path)
    assert torch.equal(again.images, first.images) and "refining again" in caplog.text


def test_refined_images_that_cannot_be_kept_are_still_returned(teacher, digits, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    refined = cached_refine(teacher, digits, PRE, 5, blocker / "refined")
    assert torch.equal(refined.images, refine_images(teacher, digits, PRE, 5).images)
    assert "could not keep the refined images" in caplog.text
