"""Models beyond torchvision's: timm by name, the user's own class, weights folders and names."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import safetensors.torch
import torch

import labelless
from labelless.cli import main
from labelless.errors import LabellessError, ModelError
from labelless.models import load_weights, save_checkpoint

NETS = '''
from pathlib import Path
import torch
from torch import nn
Path("{marker}").write_text("imported")
class Net(nn.Module):
    def __init__(self, width=8, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
'''
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A module of the user's own, importable from the working folder; its import leaves a marker."""
    name = f"labelless_user_nets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(NETS.format(marker=tmp_path / "imported"))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _saved_custom(nets, tmp_path):
    spec = labelless.ModelSpec(f"{nets}:Net", in_channels=1, image_size=12, model_args={"width": 6})
    model = labelless.build_model(spec).eval()
    quantized = labelless.quantize(model, [{"layers": "*", "weights": 4}])
    path = tmp_path / "net.lless"
    labelless.save(quantized, path)
    return quantized, path


def test_a_custom_model_is_rebuilt_only_when_its_class_is_named(nets, tmp_path):
    quantized, path = _saved_custom(nets, tmp_path)
    sys.modules.pop(nets)
    (tmp_path / "imported").unlink()
    with pytest.raises(LabellessError, match=f"--model {nets}:Net"):
        labelless.load(path)
    assert not (tmp_path / "imported").exists()  # the file's name alone imported nothing
    back = labelless.load(path, custom=f"{nets}:Net")
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(back(x), quantized(x))
    assert back.labelless_spec.model_args == {"width": 6}


def test_the_command_line_names_the_custom_class_for_decompress(nets, tmp_path, capsys):
    _, path = _saved_custom(nets, tmp_path)
    assert main(["decompress", str(path), "-o", "dense.safetensors"]) == 2
    assert f"--model {nets}:Net" in capsys.readouterr().err and not (tmp_path / "dense.safetensors").exists()
    assert main(["decompress", str(path), "-o", "dense.safetensors", "--model", f"{nets}:Net"]) == 0
    assert safetensors.torch.load_file("dense.safetensors")["conv.weight"].unique().numel() <= 4


@pytest.mark.parametrize("name, args, message", [
    ("resnet18", {"width": 2}, "model arguments are for a custom model"),
    ("not a module:Net", {}, "package.module:ClassName"),
    ("labelless_no_such_module_here:Net", {}, "cannot import"),
    ("labelless.models:NoSuchClass", {}, "has no 'NoSuchClass'"),
    ("labelless.models:ModelSpec", {}, "failed"),
])
def test_a_bad_custom_model_is_one_clear_error(name, args, message):
    with pytest.raises(ModelError, match=message):
        labelless.build_model(labelless.ModelSpec(name, model_args=args))


@needs_timm
def test_a_timm_model_round_trips_bit_exactly(tmp_path):
    spec = labelless.ModelSpec("timm:mobilenetv3_small_100", num_classes=10, in_channels=1, image_size=32)
    model = labelless.build_model(spec).eval()
    assert model.conv_stem.in_channels == 1 and model.classifier.out_features == 10
    quantized = labelless.quantize(model, [{"layers": "*", "weights": 16}])
    labelless.save(quantized, tmp_path / "m.lless")
    back = labelless.load(tmp_path / "m.lless")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), quantized(x))


@needs_timm
def test_timm_names_are_checked():
    with pytest.raises(ModelError, match="timm has no model"):
        labelless.build_model(labelless.ModelSpec("timm:no_such_net"))
    with pytest.raises(ModelError, match="must read timm:NAME"):
        labelless.ModelSpec("timm:no such net")
    with pytest.raises(ModelError, match="no small-input stem"):
        labelless.ModelSpec("timm:resnet18", small_input=True)


def test_weights_may_be_a_folder_holding_model_safetensors(tmp_path):
    spec = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=16, mean=(0.5,), std=(0.25,))
    model = labelless.build_model(spec)
    (tmp_path / "hf").mkdir()
    save_checkpoint(model, tmp_path / "hf" / "model.safetensors", spec)
    fresh = load_weights(labelless.build_model(spec), tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert labelless.models.stored_normalisation(tmp_path / "hf") == ((0.5,), (0.25,))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds none of model.safetensors"):
        load_weights(labelless.build_model(spec), tmp_path / "empty")


def test_torchvision_weight_names_come_from_the_local_hub_cache_only(tmp_path):
    import torchvision

    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        spec = labelless.ModelSpec("resnet18")
        with pytest.raises(ModelError, match="downloads nothing"):
            load_weights(labelless.build_model(spec), "ResNet18_Weights.IMAGENET1K_V1")
        url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
        (tmp_path / "checkpoints").mkdir()
        model = labelless.build_model(spec)
        torch.save(model.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
        fresh = load_weights(labelless.build_model(spec), "ResNet18_Weights.IMAGENET1K_V1")
        assert torch.equal(fresh.fc.weight, model.fc.weight)
        assert labelless.models.stored_normalisation("ResNet18_Weights.IMAGENET1K_V1")[0] == pytest.approx(
            (0.485, 0.456, 0.406))
    finally:
        torch.hub.set_dir(before)


def test_a_densenet_checkpoint_with_torchvisions_old_key_names_loads(tmp_path):
    spec = labelless.ModelSpec("densenet121", num_classes=10, in_channels=1, small_input=True)
    torch.manual_seed(0)
    model = labelless.build_model(spec)
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in model.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old  # as torchvision's published files name it
    old = {k: v for k, v in old.items() if not k.endswith("num_batches_tracked")}  # which predate this buffer
    torch.save(old, tmp_path / "densenet121-old.pth")
    fresh = load_weights(labelless.build_model(spec), tmp_path / "densenet121-old.pth")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("name, size", [("googlenet", 224), ("inception_v3", 299)])
def test_googlenet_and_inception_weights_load_without_aux_heads_and_match_torchvisions_model(tmp_path, name, size):
    import torchvision

    torch.manual_seed(0)
    published = torchvision.models.get_model(name, weights=None, aux_logits=True, transform_input=True,
                                             init_weights=True).eval()  # as torchvision builds it for its weights
    weights = {"googlenet": "GoogLeNet_Weights.IMAGENET1K_V1", "inception_v3": "Inception_V3_Weights.IMAGENET1K_V1"}
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        url = torchvision.models.get_weight(weights[name]).url
        (tmp_path / "checkpoints").mkdir()
        torch.save(published.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
        ours = load_weights(labelless.build_model(labelless.ModelSpec(name)), weights[name]).eval()
        mean, std = labelless.models.stored_normalisation(weights[name])
    finally:
        torch.hub.set_dir(before)
    pixels = torch.rand(2, 3, size, size)
    imagenet = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():  # torchvision: ImageNet normalisation, then transform_input; ours: the normalisation it equals
        want = published(imagenet(pixels))
        got = ours(torchvision.transforms.Normalize(mean, std)(pixels))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # random weights: logits of any scale


def test_a_file_of_a_custom_model_is_built_within_the_size_limit_from_its_own_arguments(nets, tmp_path):
    _, path = _saved_custom(nets, tmp_path)
    with pytest.raises(labelless.FileFormatError, match="above the limit"):
        labelless.load(path, custom=f"{nets}:Net", max_params=10)


@pytest.mark.parametrize("args", [{"width": float("nan")}, {"when": __import__("datetime").date(2026, 1, 1)},
                                  {"a": {1: "x"}}])
def test_model_arguments_must_survive_json(args):
    with pytest.raises(ModelError, match="plain values"):
        labelless.ModelSpec("pkg.mod:Net", model_args=args)


def test_search_refuses_a_sweep_of_a_custom_model_unless_it_is_named(nets, tmp_path, capsys):
    import json

    (tmp_path / "sw").mkdir()
    data = {"weights": None, "unlabeled": "digits", "labeled": None, "limit": 8, "seed": 0, "batch_size": 8,
            "skip_unreadable": False, "by": "labelless sweep"}
    model = {"name": f"{nets}:Net", "num_classes": 10, "in_channels": 1, "image_size": 12}
    sweep = {"reference": {"fp32_bytes": 10}, "rows": [], "provenance": {"model": model, "data": data}}
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(sweep))
    assert main(["search", "sw", "--max-drop", "1", "-o", "p.yaml"]) == 2
    assert f"give --model {nets}:Net" in capsys.readouterr().err
    assert not (tmp_path / "imported").exists()
