"""Model registry and checkpoint loading: adapted stems, wrappers, clear mismatch errors."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import labelless
from labelless import ModelError, ModelSpec, build_model, load_weights


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "shufflenet_v2_x0_5"])
def test_small_input_grayscale_models_run_on_28_and_32_px(name):
    spec = ModelSpec(name, num_classes=10, in_channels=1, small_input=True)
    model = build_model(spec).eval()
    with torch.no_grad():
        for size in (28, 32) if not name.startswith("vgg") else (32,):
            assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_spec_fills_defaults_and_round_trips():
    spec = ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True)
    assert spec.image_size == 32 and len(spec.mean) == 1 and len(spec.std) == 1
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="resnet9000"), "unknown model"),
        (dict(name="resnet18", num_classes=0), "num_classes"),
        (dict(name="resnet18", num_classes=10**9), "num_classes"),
        (dict(name="resnet18", in_channels=1, mean=(0.5, 0.5)), "mean needs 1"),
        (dict(name="inception_v3", small_input=True), "no small-input stem"),
    ],
)
def test_bad_specs_are_rejected(kwargs, message):
    with pytest.raises(ModelError, match=message):
        ModelSpec(**kwargs)


def test_checkpoint_wrappers_and_prefixes_are_unwrapped(tmp_path, model, spec):
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    safetensors.torch.save_file(state, tmp_path / "plain.safetensors")
    for name in ("wrapped.pt", "plain.safetensors"):
        fresh = load_weights(build_model(spec), tmp_path / name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_for_another_architecture_is_rejected_clearly(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    other = build_model(ModelSpec("resnet18", num_classes=100, in_channels=1, small_input=True))
    with pytest.raises(ModelError, match="does not fit resnet18.*fc.weight"):
        load_weights(other, tmp_path / "r18.pt")


def test_non_state_dict_files_are_rejected(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelError, match="not a state_dict"):
        labelless.load_state_dict_file(tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        labelless.load_state_dict_file(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        labelless.load_state_dict_file(tmp_path / "missing.pt")
