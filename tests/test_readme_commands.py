"""Every line of the README's command-line block runs, in order, so that none can rot.

The lines run as written (in-process, through ``labelless.cli.main``) with these changes only,
for seconds rather than minutes on a CPU:

* ``--model ...`` becomes the model flags of the ``train`` line;
* each line with ``[...]`` options runs twice: without them, and with all of them (``SPEC``
  becomes ``mnist``);
* a few flags are added to keep the work small (:data:`SMALLER`): fewer images, one epoch,
  fewer k values, and a held-out floor the few images can meet;
* ``images:photos/`` is a folder of 64 generated PNGs;
* ``config.yaml`` (written by the ``--print-config`` line) is shrunk in the same spirit
  (:data:`SHRINK`) before ``run`` reads it; ``run`` without a config is the demo itself,
  minutes long, which ``scripts/demo.sh`` runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from labelless.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")
SMALLER = {
    "train": ["--limit", "64", "--test-limit", "64", "--epochs", "1"],
    "sweep": ["--limit", "48", "--clusters", "1,16", "--importance-images", "16"],
    "quantize": ["--limit", "16"],
    "retrain": ["--limit", "64", "--epochs", "1", "--min-holdout", "5"],
}
SHRINK = {
    "model": {"image_size": 16},
    "teacher": {"limit": 128, "train": {"epochs": 1, "batch_size": 64}},
    "data": {"unlabeled_limit": 64, "test_limit": 64, "baseline_limit": 64},
    "sweep": {"clusters": [1, 16], "limit": 32, "importance_images": 16},
    "quantize": {"images": 16},
    "search": {"after_retraining": 0},
    "retrain": {"epochs": 1, "batch_size": 32, "min_holdout": 5},
}


def command_lines(text: str) -> list[str]:
    """The lines of the first ``bash`` block after the "The command line" heading, comments cut."""
    section = text[text.index("## The command line"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split(" # ")[0].strip() for line in block.splitlines() if line.strip()]


def variants(line: str) -> list[str]:
    """``line`` without its ``[...]`` options and, if it has any, with all of them."""
    if "[" not in line:
        return [line]
    bare = re.sub(r"\s*\[.*\]", "", line)
    full = re.sub(r"[\[\]]", "", line).replace("SPEC", "mnist")
    return [bare, full]


def argv_of(line: str, model_flags: list[str]) -> tuple[list[str], str | None]:
    """(arguments after ``labelless``, the file stdout is redirected to or None)."""
    words = shlex.split(line)
    assert words[0] == "labelless", line
    target = None
    if ">" in words:
        target, words = words[words.index(">") + 1], words[:words.index(">")]
    if "..." in words:  # --model ...
        at = words.index("...")
        words[at - 1:at + 1] = model_flags
    reads_images = words[1] != "quantize" or "--unlabeled" in words
    return words[1:] + (SMALLER.get(words[1], []) if reads_images else []), target


def merged(base: dict, changes: dict) -> dict:
    return {k: merged(base.get(k) or {}, v) if isinstance(v, dict) else v for k, v in changes.items()} | {
        k: v for k, v in base.items() if k not in changes}


def photos(folder: Path, n: int = 64) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_the_block_is_found_and_covers_every_command():
    lines = command_lines(README.read_text())
    commands = {shlex.split(line)[1] for line in lines}
    assert commands >= {"models", "layers", "train", "sweep", "search", "quantize", "inspect", "decompress",
                        "retrain", "export", "run"}


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Fashion-MNIST package")
def test_every_readme_command_line_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    photos(tmp_path / "photos")
    lines = command_lines(README.read_text())
    train = shlex.split(next(line for line in lines if line.split()[1] == "train"))
    model_flags = train[train.index("--model"):train.index("--data")]
    for line in lines:
        for variant in variants(line):
            argv, target = argv_of(variant, model_flags)
            if argv == ["run"]:
                continue  # the demo itself, minutes long: scripts/demo.sh runs it
            if argv[0] == "run" and "config.yaml" in argv:
                config = yaml.safe_load(Path("config.yaml").read_text())
                Path("config.yaml").write_text(yaml.safe_dump(merged(config, SHRINK | {"out": "runs/readme"})))
            capsys.readouterr()
            assert main(argv) == 0, variant
            printed = capsys.readouterr().out
            assert printed.strip(), f"{variant} printed nothing"
            if target:
                Path(target).write_text(printed)
    for made in ("ckpt.safetensors", "sweep/sweep.json", "plan.yaml", "model.lless", "dense.safetensors",
                 "retrained.lless", "model.onnx", "runs/readme/report.md"):
        assert Path(made).is_file(), made
