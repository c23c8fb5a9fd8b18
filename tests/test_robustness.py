"""Bad input: one clear line on stderr, a non-zero exit code, no traceback, nothing half-written.

Every case runs the command line in this process (``labelless.cli.main``) against a small
real network (SqueezeNet 1.1, 1 channel, 24 px, 0.7 M parameters) and checks four things: the
exit code is not 0; stderr is exactly one line, ``labelless: error: ...``, naming what is
wrong (the words each case lists) and no traceback or "internal error"; and the output folder
holds no file, finished or temporary, afterwards. docs/RELIABILITY.md tabulates the cases.

Cases that need a file the current user cannot read run with the effective user ``nobody``
(root reads everything, and the tests run as root in CI); elsewhere they use ``chmod 000``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import labelless
from labelless import LabellessError, ModelError, PlanError
from labelless.cli import main

MODEL = ["--model", "squeezenet1_1", "--num-classes", "10", "--in-channels", "1", "--image-size", "24"]
SPEC = labelless.ModelSpec("squeezenet1_1", num_classes=10, in_channels=1, image_size=24)
ALL_QUANTIZED = '- layers: "*"\n  weights: 4\n  bias: 1\n'  # SqueezeNet has no BatchNorm: nothing trainable is left


# -- fixtures: one checkpoint, one .lless file, plans, image folders -------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every input file the cases refer to, built once: ``{name}`` placeholders in the argv."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    model = labelless.build_model(SPEC).eval()
    paths = {"tmp": root, "ckpt": root / "squeezenet.safetensors", "plan": root / "plan.yaml"}
    safetensors.torch.save_file(model.state_dict(), paths["ckpt"])
    paths["plan"].write_text('- layers: "*"\n  weights: 4\n  bias: 1\n- layers: "1-2"\n  weights: null\n')
    paths["lless"] = root / "model.lless"
    labelless.save(labelless.quantize(model, labelless.load_plan(paths["plan"])), paths["lless"])
    paths.update(_checkpoints(root, model))
    paths.update(_image_folders(root))
    return paths


def _checkpoints(root: Path, model: torch.nn.Module) -> dict[str, Path]:
    """Checkpoints that are wrong in one way each."""
    state = model.state_dict()
    other = labelless.build_model(labelless.ModelSpec("shufflenet_v2_x0_5", num_classes=10, in_channels=1))
    files = {
        "other_arch": other.state_dict(),
        "pt_list": [state["features.0.weight"]],
        "pt_tensor": state["features.0.weight"],
        "pt_hyperparameters": {"epoch": 3, "lr": 0.1},
        "pt_empty": {},
        "nan": dict(state, **{"features.3.squeeze.weight": _poison(state["features.3.squeeze.weight"], float("nan"))}),
        "inf": dict(state, **{"classifier.1.bias": _poison(state["classifier.1.bias"], float("inf"))}),
    }
    paths = {}
    for name, payload in files.items():
        paths[name] = root / f"{name}.pt"
        torch.save(payload, paths[name])
    paths["pt_garbage"] = root / "garbage.pt"
    paths["pt_garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    paths["st_garbage"] = root / "garbage.safetensors"
    paths["st_garbage"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(100))
    return paths


def _poison(tensor: torch.Tensor, value: float) -> torch.Tensor:
    poisoned = tensor.clone()
    poisoned.view(-1)[::7] = value
    return poisoned


def _image_folders(root: Path) -> dict[str, Path]:
    """Tiny class-labelled folders of grayscale, RGB and mixed-mode (RGBA, palette, LA) images."""
    rng = np.random.default_rng(0)
    modes = {"gray": ["L"], "rgb": ["RGB"], "mixed": ["RGBA", "P", "LA", "RGB"]}
    paths = {}
    for name, kinds in modes.items():
        for i in range(8):
            mode = kinds[i % len(kinds)]
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            folder = root / name / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
        paths[name] = root / name
    for name in ("empty", "flat", "no_images_class/a", "corrupt"):
        (root / name).mkdir(parents=True)
    (root / "no_images_class" / "b").mkdir()
    (root / "no_images_class" / "b" / "x.png").write_bytes((root / "gray" / "class0" / "0.png").read_bytes())
    (root / "flat" / "x.png").write_bytes((root / "gray" / "class0" / "0.png").read_bytes())
    (root / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    paths.update(empty=root / "empty", flat=root / "flat", no_images_class=root / "no_images_class",
                 corrupt=root / "corrupt")
    return paths


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# -- the property every case checks --------------------------------------------------------------


def fails_cleanly(capsys, argv: list[str], out: Path, *words: str) -> str:
    """Run ``labelless argv``; assert a clean failure naming ``words``; return the error line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"exit code 0 for {argv}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("labelless: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not leftovers, f"left behind in the output folder: {leftovers}"
    return lines[0]


def _argv(template: list[str], paths: dict[str, Path], out: Path) -> list[str]:
    return [part.format(out=out, **paths) for part in template]


def _run_case(capsys, world, out, template, words) -> str:
    return fails_cleanly(capsys, _argv(template, world, out), out, *words)


QUANTIZE = ["quantize", *MODEL, "--weights", "{ckpt}", "--plan", "{plan}", "-o", "{out}/m.lless"]


def _quantize(weights: str = "{ckpt}", plan: str = "{plan}", output: str = "{out}/m.lless", model=MODEL) -> list[str]:
    return ["quantize", *model, "--weights", weights, "--plan", plan, "-o", output]


def _retrain(data: str, lless: str = "{lless}", weights: str = "{ckpt}", output: str = "{out}/r.lless") -> list[str]:
    return ["retrain", lless, "--weights", weights, "--unlabeled", data, "--epochs", "1", "--device", "cpu",
            "-o", output]


def _train(data: str, output: str = "{out}/t.safetensors", model=MODEL, extra=()) -> list[str]:
    return ["train", *model, "--data", data, "--epochs", "1", "--batch-size", "4", "--device", "cpu", *extra,
            "-o", output]


# -- 1. missing, misplaced and unreadable files ----------------------------------------------------

FILE_CASES = {
    "weights missing": (_quantize(weights="{tmp}/missing.safetensors"), ("weights file", "does not exist")),
    "weights is a folder": (_quantize(weights="{tmp}"), ("holds none of model.safetensors", "weights file")),
    "plan missing": (_quantize(plan="{tmp}/missing.yaml"), ("plan file", "does not exist")),
    "plan is a folder": (_quantize(plan="{tmp}"), ("plan file", "is a folder")),
    "inspect: file missing": (["inspect", "{tmp}/missing.lless"], ("does not exist",)),
    "inspect: a folder": (["inspect", "{tmp}"], ("is a folder",)),
    "inspect: not a .lless file": (["inspect", "{plan}"], ("not a .lless file",)),
    "decompress: file missing": (["decompress", "{tmp}/missing.lless", "-o", "{out}/d.safetensors"],
                                 ("does not exist",)),
    "export: file missing": (["export", "{tmp}/missing.lless", "-o", "{out}/m.onnx"], ("does not exist",)),
    "retrain: student missing": (_retrain("digits", lless="{tmp}/missing.lless"), ("does not exist",)),
    "retrain: teacher missing": (_retrain("digits", weights="{tmp}/missing.pt"), ("weights file", "does not exist")),
    "run: config missing": (["run", "{tmp}/missing.yaml"], ("config file", "does not exist")),
    "run: config is a folder": (["run", "{tmp}"], ("config file", "is a folder")),
    "search: sweep folder missing": (["search", "{tmp}/nosweep", "--max-drop", "1", "-o", "{out}/p.yaml"],
                                     ("does not exist", "labelless sweep")),
    "search: not a sweep folder": (["search", "{tmp}", "--max-drop", "1", "-o", "{out}/p.yaml"],
                                   ("sweep.json", "labelless sweep")),
    "search: size target not a fraction": (["search", "{tmp}", "--smaller-by", "150%", "-o", "{out}/p.yaml"],
                                           ("--smaller-by", "fraction in [0, 1)")),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_missing_or_misplaced_file_fails_cleanly(capsys, world, out, case):
    _run_case(capsys, world, out, *FILE_CASES[case])


def test_search_from_another_folder_finds_the_sweeps_relative_weights(capsys, world, tmp_path, monkeypatch):
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(world["ckpt"], work / "w.safetensors")
    monkeypatch.chdir(work)
    assert main(["sweep", *MODEL, "--weights", "w.safetensors", "--unlabeled", "digits", "--limit", "8",
                 "--clusters", "1,4", "--batch-size", "8", "-o", "sw"]) == 0
    monkeypatch.chdir(elsewhere)
    assert main(["search", str(work / "sw"), "--smaller-by", "50%", "-o", "p.yaml"]) == 0
    assert (elsewhere / "p.yaml").is_file() and (elsewhere / "p.search.png").stat().st_size > 0
    (work / "w.safetensors").unlink()
    out = tmp_path / "out"
    out.mkdir()
    fails_cleanly(capsys, ["search", str(work / "sw"), "--max-drop", "1", "-o", str(out / "p.yaml")], out,
                  "w.safetensors", "measured do not exist", "run the same `labelless sweep` again")


def _swept(tmp_path: Path, ckpt: Path, images: Path, importance: str = "none") -> list[str]:
    """A finished sweep of ``ckpt`` on the images of ``images`` (npz); the search command for it."""
    assert main(["sweep", *MODEL, "--weights", str(ckpt), "--unlabeled", f"npz:{images}", "--limit", "8",
                 "--clusters", "1,4", "--batch-size", "8", "--importance", importance, "--importance-images", "8",
                 "-o", str(tmp_path / "sw")]) == 0
    return ["search", str(tmp_path / "sw"), "--smaller-by", "50%", "-o", str(tmp_path / "out" / "p.yaml")]


def _digit_images(path: Path, start: int) -> Path:
    from sklearn.datasets import load_digits

    np.savez(path, images=(load_digits().images[start:start + 8] * 16).astype(np.uint8))
    return path


def test_search_refuses_weights_changed_since_the_sweep(capsys, world, tmp_path):
    ckpt = shutil.copy(world["ckpt"], tmp_path / "w.safetensors")
    search = _swept(tmp_path, ckpt, _digit_images(tmp_path / "x.npz", 0))
    (tmp_path / "out").mkdir()
    assert main(search) == 0  # the same weights and images: searched
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").mkdir()
    state = safetensors.torch.load_file(ckpt)
    state["classifier.1.bias"] += 1.0  # retrained since, same file name
    safetensors.torch.save_file(state, ckpt)
    fails_cleanly(capsys, search, tmp_path / "out", "w.safetensors", "differ from those the sweep",
                  "run the same `labelless sweep` again")


def test_search_refuses_images_changed_since_the_sweep(capsys, world, tmp_path):
    images = _digit_images(tmp_path / "x.npz", 0)
    search = _swept(tmp_path, world["ckpt"], images)
    (tmp_path / "out").mkdir()
    _digit_images(images, 100)  # other images under the same spec
    fails_cleanly(capsys, search, tmp_path / "out", "images read now are not those the sweep",
                  "run the same `labelless sweep` again")


def test_search_refuses_a_sweep_whose_importance_is_gone(capsys, world, tmp_path):
    search = _swept(tmp_path, world["ckpt"], _digit_images(tmp_path / "x.npz", 0), importance="fisher")
    (tmp_path / "out").mkdir()
    (tmp_path / "sw" / "importance.safetensors").unlink()
    fails_cleanly(capsys, search, tmp_path / "out", "lacks importance.safetensors", "clustered with")


def test_search_refuses_a_hand_edited_provenance_in_one_line(capsys, world, tmp_path):
    search = _swept(tmp_path, world["ckpt"], _digit_images(tmp_path / "x.npz", 0))
    (tmp_path / "out").mkdir()
    data = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    data["provenance"]["data"]["weights"] = 5
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(data))
    fails_cleanly(capsys, search, tmp_path / "out", "provenance field 'weights' must be a weights file", "got 5")


def test_search_refuses_a_sweep_without_provenance(capsys, world, tmp_path):
    search = _swept(tmp_path, world["ckpt"], _digit_images(tmp_path / "x.npz", 0))
    (tmp_path / "out").mkdir()
    data = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    del data["provenance"]  # as an older labelless wrote it
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(data))
    fails_cleanly(capsys, search, tmp_path / "out", "sweep.json does not say what it measured",
                  "reuses its finished rows")


def test_cut_sweep_json_fails_cleanly(capsys, world, out, tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    args = {"model": "squeezenet1_1", "num_classes": 10, "in_channels": 1, "small_input": False, "image_size": 24,
            "weights": str(world["ckpt"]), "unlabeled": "digits", "labeled": None, "limit": 8, "seed": 0,
            "batch_size": 8}
    (folder / "config.json").write_text(json.dumps(args))
    (folder / "sweep.json").write_text('{"reference": {"fp32_bytes": 10}, "rows": [{"index": 1, ')
    fails_cleanly(capsys, ["search", str(folder), "--max-drop", "1", "-o", f"{out}/p.yaml"], out, "cannot read",
                  "sweep.json", "again")


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the block with the effective user ``nobody`` (root only), so that permissions bite."""
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder ``nobody`` can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="labelless-robustness-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _locked(path: Path) -> Path:
    """``path`` made unreadable: mode 000 for a file, 000 for a folder."""
    path.chmod(0o000)
    return path


UNREADABLE_CASES = {
    "weights unreadable": (lambda d: _quantize(weights=str(d / "w.safetensors"), plan=str(d / "plan.yaml"),
                                               output=str(d / "out" / "m.lless")), ("cannot read", "permission denied")),
    "plan unreadable": (lambda d: _quantize(weights=str(d / "ok.safetensors"), plan=str(d / "locked.yaml"),
                                            output=str(d / "out" / "m.lless")), ("cannot read", "plan file")),
    ".lless unreadable (inspect)": (lambda d: ["inspect", str(d / "m.lless")], ("cannot read", "permission denied")),
    "run config unreadable": (lambda d: ["run", str(d / "run.yaml")], ("cannot read", "config file")),
    "image folder unreadable": (lambda d: _train(f"imagefolder:{d / 'images'}", output=str(d / "out" / "t.st")),
                                ("cannot read", "permission denied")),
    "output folder not writable": (lambda d: _quantize(weights=str(d / "ok.safetensors"), plan=str(d / "ok.yaml"),
                                                       output=str(d / "readonly" / "m.lless")),
                                   ("not writable", "choose another -o")),
}


@pytest.mark.parametrize("case", UNREADABLE_CASES)
def test_unreadable_input_or_unwritable_output_fails_cleanly(capsys, world, shared_dir, case):
    d = shared_dir
    (d / "out").mkdir(mode=0o777)
    (d / "out").chmod(0o777)
    for name in ("w.safetensors", "ok.safetensors"):
        shutil.copy(world["ckpt"], d / name)
    for name in ("plan.yaml", "locked.yaml", "ok.yaml"):
        shutil.copy(world["plan"], d / name)
    shutil.copy(world["lless"], d / "m.lless")
    (d / "run.yaml").write_text("device: cpu\n")
    shutil.copytree(world["gray"], d / "images")
    (d / "readonly").mkdir(mode=0o755)
    for path in d.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (d / "out").chmod(0o777)
    for path in (d / "w.safetensors", d / "locked.yaml", d / "m.lless", d / "run.yaml", d / "images" / "class0"):
        _locked(path)
    make_argv, words = UNREADABLE_CASES[case]
    if os.geteuid() == 0:
        with as_nobody():
            fails_cleanly(capsys, make_argv(d), d / "out", *words)
    else:  # an ordinary user: mode 000 is enough, except for the folder test, which needs another owner
        if case == "output folder not writable":
            (d / "readonly").chmod(0o555)
        fails_cleanly(capsys, make_argv(d), d / "out", *words)


# -- 2. checkpoints that do not fit ----------------------------------------------------------------

CHECKPOINT_CASES = {
    "another architecture": (_quantize(weights="{other_arch}"), ("does not fit squeezenet1_1", "--model")),
    "wrong number of classes": (_quantize(model=[*MODEL[:2], "--num-classes", "100", *MODEL[4:]]),
                                ("does not fit", "shape", "--num-classes")),
    "wrong input channels": (_quantize(model=[*MODEL[:4], "--in-channels", "3", *MODEL[6:]]),
                             ("does not fit", "features.0.weight", "--in-channels")),
    ".pt holding a list": (_quantize(weights="{pt_list}"), ("not a state_dict", "save model.state_dict()")),
    ".pt holding one tensor": (_quantize(weights="{pt_tensor}"), ("not a state_dict",)),
    ".pt holding hyperparameters": (_quantize(weights="{pt_hyperparameters}"), ("not a state_dict",)),
    ".pt holding an empty dict": (_quantize(weights="{pt_empty}"), ("not a state_dict",)),
    ".pt of random bytes": (_quantize(weights="{pt_garbage}"), ("not a readable PyTorch checkpoint",)),
    ".safetensors of garbage": (_quantize(weights="{st_garbage}"), ("not a readable safetensors file",)),
    "NaN weights": (_quantize(weights="{nan}"), ("features.3.squeeze.weight", "NaN or infinite", "checkpoint")),
    "infinite bias": (_quantize(weights="{inf}"), ("classifier.1.bias", "NaN or infinite")),
    "retrain: teacher of another architecture": (_retrain("digits", weights="{other_arch}"), ("does not fit",)),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_that_does_not_fit_fails_cleanly(capsys, world, out, case):
    _run_case(capsys, world, out, *CHECKPOINT_CASES[case])


def test_quantize_refuses_non_finite_weights_and_names_the_tensor():
    model = labelless.build_model(SPEC).eval()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
        model.classifier[1].bias[3] = float("-inf")
    with pytest.raises(ModelError, match=r"^features\.0\.weight holds 1 NaN or infinite value\(s\) of 576"):
        labelless.quantize(model, [{"layers": "*", "weights": 4}])
    with pytest.raises(ModelError, match=r"^classifier\.1\.bias holds 1 NaN"):
        labelless.quantize(model, [{"layers": "*", "bias": 2}])


def test_safetensors_checkpoint_of_a_versioned_module_loads(tmp_path):
    """safetensors keeps no per-module versions; torchvision's MNASNet refused such a checkpoint."""
    spec = labelless.ModelSpec("mnasnet0_5", num_classes=10, in_channels=1, image_size=24)
    source = labelless.build_model(spec).eval()
    safetensors.torch.save_file(source.state_dict(), tmp_path / "mnasnet.safetensors")
    loaded = labelless.load_weights(labelless.build_model(spec), tmp_path / "mnasnet.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


# -- 3. plans --------------------------------------------------------------------------------------

PLAN_CASES = {
    "selects no layer (name)": ('- layers: "classifier.9"\n  weights: 4\n', ("matches no layer", "valid:")),
    "selects no layer (type)": ('- layers: "type:BatchNorm2d"\n  weights: 4\n', ("matches no layer",)),
    "quantizes nothing (all null)": ('- layers: "*"\n  weights: null\n  bias: null\n', ("quantizes nothing",)),
    "layer index out of range": ('- layers: "99"\n  weights: 4\n', ("out of range", "numbered 1-26")),
    "layer index 0": ('- layers: "0"\n  weights: 4\n', ("out of range",)),
    "range backwards": ('- layers: "5-2"\n  weights: 4\n', ("runs backwards",)),
    "k = 0": ('- layers: "*"\n  weights: 0\n', ("between 1 and",)),
    "k < 0": ('- layers: "*"\n  bias: -3\n', ("between 1 and",)),
    "k a fraction": ('- layers: "*"\n  weights: 4.5\n', ("whole number of centroids",)),
    "k a word": ('- layers: "*"\n  weights: four\n', ("whole number of centroids",)),
    "k a boolean": ('- layers: "*"\n  weights: true\n', ("whole number of centroids",)),
    "unknown field": ('- layers: "*"\n  weigths: 4\n', ("unknown field", "weigths", "valid fields")),
    "rule without layers": ("- weights: 4\n", ("no 'layers' selector",)),
    "rule setting nothing": ('- layers: "*"\n', ("sets neither",)),
    "bad regular expression": ('- layers: "re:("\n  weights: 4\n', ("bad regular expression",)),
    "malformed YAML": ('- layers: "*\n  weights: [4\n', ("not valid YAML/JSON", "fix the syntax")),
    "malformed JSON": ('[{"layers": "*", "weights": 4,, }]', ("not valid YAML/JSON",)),
    "empty file": ("", ("non-empty list",)),
    "a mapping, not a list": ("layers: '*'\nweights: 4\n", ("non-empty list",)),
    "binary file": (b"\xff\xfe\x00\x81garbage", ("not valid YAML/JSON",)),
}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_bad_plan_fails_cleanly(capsys, world, out, tmp_path, case):
    text, words = PLAN_CASES[case]
    plan = tmp_path / ("plan.json" if "JSON" in case else "plan.yaml")
    plan.write_bytes(text if isinstance(text, bytes) else text.encode())
    _run_case(capsys, world, out, _quantize(plan=str(plan)), words)


def test_more_centroids_than_values_are_clamped_with_a_warning(capsys, caplog, world, out, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text('- layers: "1"\n  weights: 100000\n  bias: 4096\n')  # features.0: 576 weights, 64 biases
    with caplog.at_level(logging.WARNING, logger="labelless"):
        assert main(_argv(_quantize(plan=str(plan)), world, out)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ("features.0.weight: 100000 centroids asked for but it has only 576 values; using 576 "
            "(each value kept exactly)") in warnings
    assert any(w.startswith("features.0.bias: 4096 centroids asked for but it has only 64 values") for w in warnings)
    model = labelless.load(out / "m.lless")
    reference = labelless.build_model(SPEC)
    labelless.load_weights(reference, world["ckpt"])
    assert torch.equal(model.features[0].weight, reference.features[0].weight)  # kept exactly


# -- 4. data -------------------------------------------------------------------------------------

DATA_CASES = {
    "empty image folder": (_retrain("images:{empty}"), ("no images", "folder of image files")),
    "undecodable image": (_retrain("images:{corrupt}"), ("cannot decode", "broken.png", "remove or convert")),
    "imagefolder without class folders": (_train("imagefolder:{flat}"), ("no class subfolders",)),
    "imagefolder with an empty class": (_train("imagefolder:{no_images_class}"), ("holds no images",)),
    "spec names nothing (empty)": (_train(""), ("unknown data spec ''", "use one of")),
    "spec names nothing (unknown name)": (_retrain("cifar-10"), ("unknown data spec 'cifar-10'",)),
    "spec names no path": (_retrain("images:"), ("names no path", "images:PATH")),
    "spec is a bare path": (_retrain("{gray}"), ("prefix it with images:",)),
    "folder missing": (_retrain("images:{tmp}/nothing"), ("does not exist",)),
    "npz missing": (_retrain("npz:{tmp}/x.npz"), ("npz file", "does not exist")),
    "npz spec naming a folder": (_retrain("npz:{tmp}"), ("npz file", "is a folder")),
    "labels needed, images: given": (_train("images:{gray}"), ("has no labels", "imagefolder:PATH")),
    "limit 0": (_train("digits", extra=("--limit", "0")), ("limit must be a whole number >= 1",)),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_fails_cleanly(capsys, world, out, case):
    _run_case(capsys, world, out, *DATA_CASES[case])


def test_skip_unreadable_leaves_out_and_names_every_bad_image(world, tmp_path, caplog):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(world["gray"], photos)
    good = (photos / "class0" / "0.png").read_bytes()
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header that is no PNG
    (photos / "cut.png").write_bytes(good[: len(good) // 2])  # a valid header, then the file ends
    with pytest.raises(labelless.DataError, match="broken.png.*--skip-unreadable"):  # by default: an error
        labelless.open_images(f"images:{photos}", size=12)
    with caplog.at_level(logging.WARNING, logger="labelless"):
        data = labelless.open_images(f"images:{photos}", size=12, skip_unreadable=True)
    assert len(data) == 8 and all(data[i].shape == (1, 12, 12) for i in range(len(data)))
    assert "left out 2 unreadable image(s) of 10" in caplog.text
    assert "broken.png" in caplog.text and "cut.png" in caplog.text
    out = tmp_path / "out"
    out.mkdir()
    argv = _argv(_retrain(f"images:{photos}", output=str(out / "r.lless")), world, out) + ["--skip-unreadable"]
    assert main(argv) == 0 and (out / "r.lless").is_file()


@pytest.mark.parametrize("folder, in_channels", [("gray", 3), ("rgb", 1), ("mixed", 1), ("mixed", 3)],
                         ids=["grayscale data, RGB model", "RGB data, grayscale model", "RGBA/palette/LA data, "
                              "grayscale model", "RGBA/palette/LA data, RGB model"])
def test_channels_are_adapted_to_the_model(capsys, world, out, folder, in_channels):
    model = ["--model", "squeezenet1_1", "--num-classes", "2", "--in-channels", str(in_channels), "--image-size", "24"]
    argv = _argv(_train(f"imagefolder:{{{folder}}}", model=model), world, out)
    assert main(argv) == 0, capsys.readouterr().err
    state = safetensors.torch.load_file(out / "t.safetensors")
    assert state["features.0.weight"].shape[1] == in_channels
    data = labelless.data.open_images(f"imagefolder:{world[folder]}", labeled=True, size=24, channels=in_channels)
    images, _ = data[0]
    assert images.shape == (in_channels, 24, 24) and images.dtype == torch.uint8


# -- 5. outputs ----------------------------------------------------------------------------------

OUTPUT_CASES = {
    "quantize: folder missing": (_quantize(output="{out}/no/m.lless"), ("does not exist", "create it first")),
    "quantize: output is a folder": (_quantize(output="{out}"), ("is a folder", "name of a file")),
    "quantize: folder is a file": (_quantize(output="{plan}/m.lless"), ("is not a folder",)),
    "decompress: folder missing": (["decompress", "{lless}", "-o", "{out}/no/d.safetensors"], ("does not exist",)),
    "export: folder missing": (["export", "{lless}", "-o", "{out}/no/m.onnx"], ("does not exist",)),
    "train: folder missing": (_train("digits", output="{out}/no/t.safetensors"), ("does not exist",)),
    "retrain: folder missing": (_retrain("digits", output="{out}/no/r.lless"), ("does not exist",)),
    "search: folder missing": (["search", "{tmp}", "--max-drop", "1", "-o", "{out}/no/p.yaml"], ("does not exist",)),
    "sweep: -o is a file": (["sweep", *MODEL, "--weights", "{ckpt}", "--unlabeled", "digits", "-o", "{plan}"],
                            ("File exists", "plan.yaml")),
}


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_bad_output_path_fails_cleanly(capsys, world, out, case):
    _run_case(capsys, world, out, *OUTPUT_CASES[case])


def test_outputs_are_ordinary_files_not_private_ones(world, out):
    assert main(_argv(QUANTIZE, world, out)) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "m.lless").stat().st_mode & 0o777 == 0o666 & ~mask


# -- 6. models -----------------------------------------------------------------------------------

MODEL_CASES = {
    "unknown model": (["layers", "--model", "resnet1"], ("unknown model 'resnet1'", "resnet18")),
    "zero classes": (["layers", "--model", "resnet18", "--num-classes", "0"], ("num_classes must be",)),
    "image too small for the network": (["layers", *MODEL[:-1], "16"],
                                        ("squeezenet1_1 cannot take 16x16 input", "larger --image-size")),
    "vgg16 at 16 px": (["layers", "--model", "vgg16", "--image-size", "16"], ("vgg16 cannot take 16x16",)),
    "wrong number of means": (["layers", *MODEL, "--mean", "0.1,0.2"], ("mean needs 1 value",)),
    "unknown device": (_train("digits", extra=("--device", "gpu")), ("unknown device 'gpu'",)),
}


SWEEP = ["sweep", *MODEL, "--weights", "{ckpt}", "--unlabeled", "digits", "--limit", "8", "-o", "{out}/sw"]
SWEEP_CASES = {
    "k too large": ([*SWEEP, "--clusters", "1,100000"], ("clusters above 65536", "sweep at most 65536")),
    "k zero": ([*SWEEP, "--clusters", "0,4"], ("clusters must be whole numbers >= 1",)),
    "no GPU": ([*SWEEP, "--device", "cuda"], ("no usable CUDA GPU", "--device cpu")),
}


@pytest.mark.parametrize("case", SWEEP_CASES)
def test_bad_sweep_flags_fail_before_any_work_or_file(capsys, world, out, case):
    if case == "no GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _run_case(capsys, world, out, *SWEEP_CASES[case])


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_flags_fail_cleanly(capsys, world, out, case):
    _run_case(capsys, world, out, *MODEL_CASES[case])


def test_model_without_quantizable_layer_is_a_plan_error():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.LayerNorm(4))
    with pytest.raises(PlanError, match="^Sequential has no quantizable layer; labelless quantizes Conv"):
        labelless.quantize(model, [{"layers": "*", "weights": 4}])


# -- 7. nothing left to retrain -------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_quantized(world) -> Path:
    """SqueezeNet (no BatchNorm) with every weight and bias quantized: no parameter is left to train."""
    path = world["tmp"] / "all.lless"
    model = labelless.load_weights(labelless.build_model(SPEC), world["ckpt"]).eval()
    labelless.save(labelless.quantize(model, [{"layers": "*", "weights": 4, "bias": 1}]), path)
    return path


def test_retrain_says_nothing_is_left_and_writes_the_model_unchanged(capsys, caplog, world, all_quantized, out):
    argv = _argv(_retrain("digits", lless=str(all_quantized)), world, out) + ["--limit", "16"]
    with caplog.at_level(logging.WARNING, logger="labelless"):
        assert main(argv) == 0, capsys.readouterr().err
    assert any("nothing is left to retrain" in r.getMessage() for r in caplog.records)
    _assert_same_outputs(all_quantized, out / "r.lless")


def test_retrain_with_tune_centroids_trains_when_everything_is_quantized(capsys, world, all_quantized, out):
    argv = _argv(_retrain("digits", lless=str(all_quantized)), world, out) + ["--limit", "16", "--tune-centroids"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "r.lless").is_file()


def test_run_says_nothing_is_left_to_retrain_and_keeps_the_quantized_model(capsys, caplog, world, tmp_path):
    plan = tmp_path / "all.yaml"
    plan.write_text(ALL_QUANTIZED)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": {"name": "squeezenet1_1", "num_classes": 10, "in_channels": 1, "image_size": 24,
                  "weights": str(world["ckpt"])},
        "data": {"unlabeled": "digits", "unlabeled_limit": 16, "test": "digits", "test_limit": 16,
                 "baseline": "digits", "baseline_limit": 16},
        "search": {"plan": str(plan)}, "retrain": {"epochs": 1, "tune_centroids": False},  # the run tunes them
        "device": "cpu", "out": str(tmp_path / "run")}))  # squeezenet: no BatchNorm, so no refinement either
    with caplog.at_level(logging.WARNING, logger="labelless"):
        assert main(["run", str(config)]) == 0, capsys.readouterr().err
    assert sum("nothing is left to retrain" in r.getMessage() for r in caplog.records) == 2  # label-free, baseline
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "nothing is left to retrain" in report["retrained_labelfree"]["skipped"]
    assert report["retrained_labelfree"]["accuracy"] == report["quantized"]["accuracy"]
    _assert_same_outputs(tmp_path / "run" / "quantized.lless", tmp_path / "run" / "model.lless")


def _assert_same_outputs(a: Path, b: Path) -> None:
    x = torch.rand(4, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(labelless.load(a)(x), labelless.load(b)(x))


# -- 8. labelless run configs ------------------------------------------------------------------------

RUN_CASES = {
    "unknown field": ("modle: {name: resnet18}\n", ("unknown field(s) ['modle']", "valid:")),
    "unknown nested field": ("model: {nmae: resnet18}\n", ("run config.model: unknown field(s) ['nmae']",)),
    "wrong type: whole number": ("model: {num_classes: ten}\n", ("run config.model.num_classes must be a whole number",)),
    "wrong type: fraction for epochs": ("retrain: {epochs: 1.5}\n", ("run config.retrain.epochs must be a whole",)),
    "wrong type: boolean": ("baseline: maybe\n", ("run config.baseline must be true or false",)),
    "wrong type: list of numbers": ("sweep: {clusters: [a, b]}\n", ("run config.sweep.clusters must be a whole",)),
    "wrong type: section not a mapping": ("retrain: 5\n", ("run config.retrain must be a mapping",)),
    "bad value: negative epochs": ("retrain: {epochs: -1}\n", ("run config.retrain: epochs must be a whole number >= 1",)),
    "bad value: quantize images 0": ("quantize: {images: 0}\n", ("run config.quantize: quantize.images must be a whole number >= 1",)),
    "bad value: zero epochs": ("retrain: {epochs: 0}\n", ("run config.retrain: epochs must be a whole number >= 1 (0 would train nothing)",)),
    "bad value: teacher epochs 0": ("teacher: {train: {epochs: 0}}\n", ("run config.teacher.train: train needs",)),
    "bad value: metric": ("search: {metric: acuracy}\n", ("search.metric must be agreement or balanced",)),
    "bad value: max_drop": ("search: {max_drop: -1}\n", ("search.max_drop must be >= 0",)),
    "bad value: smaller_by": ("search: {smaller_by: 1.5}\n", ("smaller_by must be a fraction in [0, 1)",)),
    "another config version": ("version: 2\n", ("config version 2 is not one this labelless reads (1)",)),
    "no search budget": ("search: {max_drop: null, smaller_by: null}\n", ("search needs a budget: max_drop, max_bytes or smaller_by",)),
    "bad value: entropy": ("storage: {entropy: zip}\n", ("storage.entropy must be none or ans, got 'zip'",)),
    "bad value: batchnorm mode": ("retrain: {bn: train}\n", ("retrain.bn must be frozen or update, got 'train'",)),
    "bad value: loss": ("retrain: {loss: l1}\n", ("retrain.loss must be kl or mse, got 'l1'",)),
    "bad value: clusters": ("sweep: {clusters: [0, 4]}\n", ("run config.sweep: clusters must be whole numbers >= 1",)),
    "bad value: limit": ("sweep: {limit: 0}\n", ("sweep.limit must be a whole number >= 1",)),
    "bad data spec": ("data: {unlabeled: cifar}\n", ("run config data.unlabeled: unknown data spec 'cifar'",)),
    "data folder missing": ("data: {test: 'images:/nonexistent/x'}\n", ("data.test", "does not exist")),
    "unknown model": ("model: {name: resnet1}\n", ("unknown model 'resnet1'",)),
    "image too small": ("model: {name: squeezenet1_1, image_size: 8}\n", ("cannot take 8x8 input",)),
    "weights missing": ("model: {weights: /nonexistent/w.safetensors}\n", ("model.weights file", "does not exist")),
    "plan out of range": ("search: {plan: '{tmp}/p99.yaml'}\n", ("out of range",)),
    "unknown device": ("device: gpu\n", ("unknown device 'gpu'",)),
    "out is a file": ("out: '{plan}'\n", ("is a file", "give a folder")),
    "malformed YAML": ("model: {name: [\n", ("not valid YAML", "fix the syntax")),
    "not a mapping": ("- a\n- b\n", ("run config must be a mapping",)),
}


@pytest.mark.parametrize("case", RUN_CASES)
def test_bad_run_config_fails_at_once_and_writes_nothing(capsys, world, out, tmp_path, case):
    text, words = RUN_CASES[case]
    (world["tmp"] / "p99.yaml").write_text('- layers: "99"\n  weights: 4\n')
    config = tmp_path / "run.yaml"
    text = text.replace("{tmp}", str(world["tmp"])).replace("{plan}", str(world["plan"]))
    if "out:" not in text and not text.startswith("-"):
        text += f"out: '{out}/run'\n"
    config.write_text(text)
    fails_cleanly(capsys, ["run", str(config)], out, *words)


def test_a_config_built_in_python_is_checked_as_one_read_from_yaml(tmp_path):
    from labelless.pipeline import RunConfig, run_pipeline
    from labelless.retrain import BatchNorm, RetrainConfig
    from labelless.runconfig import DataSection, SearchSection

    with pytest.raises(LabellessError, match="search.max_drop must be >= 0"):
        SearchSection(max_drop=-1)
    with pytest.raises(LabellessError, match="data.test_limit must be a whole number >= 1"):
        DataSection(test_limit=0)
    with pytest.raises(LabellessError, match="bn must be frozen or update, got 'train'"):
        RetrainConfig(bn="train")
    assert RetrainConfig(bn="update").bn is BatchNorm.UPDATE == "update"  # a plain string becomes its choice
    with pytest.raises(LabellessError, match="unknown device 'gpu'"):
        run_pipeline(RunConfig(device="gpu", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before any work or file


def test_errors_about_a_choice_name_its_values_as_plain_strings(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["search", str(tmp_path), "--max-drop", "1", "--metric", "agreemnt", "-o", str(tmp_path / "p.yaml")])
    assert "(choose from 'agreement', 'balanced', 'accuracy')" in capsys.readouterr().err
    with pytest.raises(LabellessError, match=r"entropy must be one of \['none', 'ans'\], got 'zip'"):
        labelless.save(torch.nn.Linear(2, 2), tmp_path / "m.lless", entropy="zip")
    assert not list(tmp_path.iterdir())  # nothing written


def test_argparse_errors_are_usage_plus_one_error_line(capsys):
    """Flags argparse rejects (a word for --clusters) exit 2 with its usage line and one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *MODEL, "--weights", "w", "--unlabeled", "digits", "--clusters", "1,four", "-o", "x"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert err[0].startswith("usage: labelless sweep") and err[-1].endswith("expected comma-separated whole numbers, "
                                                                            "got '1,four'")


def test_sweep_with_bad_input_leaves_no_empty_folder(capsys, world, out):
    fails_cleanly(capsys, ["sweep", *MODEL, "--weights", str(world["ckpt"]), "--unlabeled", "cifar", "-o",
                           f"{out}/sweep"], out, "unknown data spec")



def test_retrain_with_an_empty_data_spec_names_it(capsys, world, out):
    _run_case(capsys, world, out, _retrain(""), ("unknown data spec ''",))


def test_training_for_four_steps_works(capsys, world, out):
    assert main(_argv(_train("digits", extra=("--limit", "16")), world, out)) == 0, capsys.readouterr().err
