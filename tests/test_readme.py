"""Every Python block of the README runs, so that it cannot rot.

The blocks run as written but for two substitutions, for seconds rather than minutes on a CPU:
every ``open_images(...)`` gets ``limit=LIMIT`` and the checkpoint they read is a freshly
initialised model saved under the name they use. The retraining epochs stay the defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import labelless
from labelless.models import save_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
LIMIT = 64
FASHION = Path("/usr/share/datasets/fashion-mnist")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def limited(code: str) -> str:
    """Every ``open_images(...)`` call with ``limit=LIMIT`` added (calls hold no nested parentheses)."""
    return re.sub(r"open_images\(([^()]*)\)", rf"open_images(\1, limit={LIMIT})", code)


def test_the_readme_has_python_blocks_and_every_open_images_call_is_limited():
    blocks = python_blocks(README.read_text())
    assert blocks, "the README lost its Python example"
    for block in blocks:
        assert block.count("open_images(") == limited(block).count(f"limit={LIMIT}")


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Fashion-MNIST package")
@pytest.mark.parametrize("block", python_blocks(README.read_text()))
def test_readme_python_block_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in set(re.findall(r'"([\w./-]+\.safetensors)"', block)):
        spec = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=28)
        save_checkpoint(labelless.build_model(spec), name, spec)
    exec(compile(limited(block), str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()  # the block printed what it promises
