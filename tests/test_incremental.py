"""Prefix/suffix splitting: the suffix of the cached prefix is the whole model, exactly."""

from __future__ import annotations

import pytest
import torch

import labelless
from labelless.incremental import Splitter


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_suffix_of_prefix_equals_the_model_at_every_layer(name):
    spec = labelless.ModelSpec(name, num_classes=10, in_channels=1, small_input=True)
    model = labelless.build_model(spec).eval()
    x = torch.randn(2, 1, 32, 32)
    splitter = Splitter(model)
    assert splitter.graph_module is not None
    with torch.no_grad():
        expected = model(x)
        for layer in labelless.list_layers(model)[::3]:
            prefix, suffix = splitter.split(layer.name)
            assert torch.equal(suffix(*prefix(x)), expected), layer.name


def test_suffix_sees_weight_changes_and_prefix_does_not(tiny):
    splitter = Splitter(tiny)
    prefix, suffix = splitter.split("fc1")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        frontier = prefix(x)
        before = suffix(*frontier)
        tiny.fc1.weight.mul_(0.5)
        assert torch.equal(prefix(x)[0], frontier[0])
        after = suffix(*frontier)
        assert torch.equal(after, tiny(x)) and not torch.equal(after, before)


def test_untraceable_model_falls_back_to_the_whole_forward():
    class Dynamic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return -self.fc(x)

    model = Dynamic()
    prefix, suffix = Splitter(model).split("fc")
    x = torch.randn(2, 4)
    assert torch.equal(suffix(*prefix(x)), model(x))
