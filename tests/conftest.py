"""Shared fixtures: tiny seeded models, CPU only, seconds not minutes."""

from __future__ import annotations

import os

import pytest
import torch

import labelless

os.environ.setdefault("LABELLESS_PROGRESS", "0")
# The test models are tiny: one thread is faster than two fighting over a busy machine.
torch.set_num_threads(int(os.environ.get("LABELLESS_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def spec() -> labelless.ModelSpec:
    """A real torchvision network sized for 32 px grayscale images."""
    return labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True)


@pytest.fixture
def model(spec) -> torch.nn.Module:
    return labelless.build_model(spec).eval()


@pytest.fixture
def images(spec) -> torch.Tensor:
    return torch.randn(4, spec.in_channels, spec.image_size, spec.image_size)


class TinyNet(torch.nn.Module):
    """Conv, depthwise conv, BatchNorm and two Linear layers: every stage in a blink."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc1 = torch.nn.Linear(128, 64)
        self.fc2 = torch.nn.Linear(64, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.depthwise(torch.relu(self.conv(x)))))
        return self.fc2(torch.relu(self.fc1(self.pool(x).flatten(1))))


@pytest.fixture
def tiny() -> TinyNet:
    return TinyNet().eval()


class Images(torch.utils.data.Dataset):
    """An unlabelled dataset over a uint8 tensor of images: there is no label to read."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
