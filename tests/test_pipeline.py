"""labelless run end to end on a tiny config: every file and every report field."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from labelless.cli import main

TINY = {
    "model": {"name": "resnet18", "image_size": 16},
    "teacher": {"limit": 512, "train": {"epochs": 1, "batch_size": 64}},
    "data": {"unlabeled_limit": 128, "test_limit": 128, "baseline_limit": 128},
    "sweep": {"clusters": [1, 4, 16], "limit": 32},
    "search": {"max_drop": 25.0, "smaller_by": None, "after_retraining": 2, "retrain_images": 128},
    "retrain": {"epochs": 1, "batch_size": 64, "min_holdout": 10, "refine_steps": 0},  # 13 of 128 images held out
}
REFINED = {**TINY, "retrain": {**TINY["retrain"], "refine_steps": 1}}  # a single step, to exercise refined/


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the Fashion-MNIST package")
def test_run_writes_model_report_sweep_and_config(tmp_path, capsys, caplog, monkeypatch):
    from labelless import calibrate

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(REFINED, out=str(tmp_path / "out"))))
    compensated = []
    real_compensate = calibrate.compensate_indices
    monkeypatch.setattr(calibrate, "compensate_indices",
                        lambda *a, **k: compensated.append(1) or real_compensate(*a, **k))
    assert main(["run", str(config)]) == 0
    out = tmp_path / "out"
    for name in ("model.lless", "quantized.lless", "baseline.lless", "report.md", "report.json", "config.yaml",
                 "plan.yaml", "search.json", "search.png", "sweep/sweep.csv", "sweep/heatmap.png", "sweep/pareto.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for section in ("original", "quantized", "retrained_labelfree", "retrained_labeled"):
        assert 0 <= report[section]["accuracy"] <= 100 and report[section]["bytes"] > 0
    for section in ("retrained_labelfree", "retrained_labeled"):
        assert report[section]["seconds"] > 0
    assert report["size_reduction"] == pytest.approx(1 - report["retrained_labelfree"]["bytes"] / report["original"]["bytes"])
    assert report["unlabeled_data"] == "mnist" and report["labeled_data"] == "fashion-mnist" and report["plan"]
    assert yaml.safe_load((out / "config.yaml").read_text())["sweep"]["clusters"] == [1, 4, 16]
    searched = json.loads((out / "search.json").read_text())
    rescored = [c for c in searched["alternatives"] if c["retrained_drop"] is not None]
    # the search measured every plan as shipped (compensated), once each; the quantize stage reused its model
    assert len(compensated) == len(searched["alternatives"]) > len(rescored)
    assert len(rescored) == 2 and report["search"]["retrained_drop"] == searched["best"]["retrained_drop"]
    assert searched["best"]["retrained_drop"] <= 25.0 or searched["best"]["bytes"] == max(c["bytes"] for c in rescored)
    printed = capsys.readouterr().out
    assert "retrained_labelfree" in printed and "size reduction" in printed
    won = report["retrained_labelfree"]["accuracy"] - report["quantized"]["accuracy"]
    assert report["recovery"]["won_back"] == pytest.approx(won, abs=1e-4) and report["recovery"]["metric"] == "accuracy"
    assert f"label-free retraining won back {won:+.2f}" in printed  # the recovery, said in points
    assert f"won back {won:+.2f}" in (out / "report.md").read_text()
    plan = (out / "plan.yaml").read_text()
    with caplog.at_level("INFO", logger="labelless"):
        assert main(["run", str(config)]) == 0  # again: teacher, sweep and search reused
    assert any("reusing the plan searched earlier" in r.getMessage() for r in caplog.records)
    again = json.loads((out / "report.json").read_text())
    assert (out / "plan.yaml").read_text() == plan and again["search"] == report["search"]
    assert again["quantized"]["accuracy"] == report["quantized"]["accuracy"]
    # the retraining images were refined once (the search's and the run's), then read back, to the same model
    assert len(list((out / "refined").glob("*.safetensors"))) == 2  # the search's images and the run's
    assert any("refined earlier" in r.getMessage() for r in caplog.records)
    assert again["retrained_labelfree"]["agreement"] == report["retrained_labelfree"]["agreement"]
    # the run's sweep says what it measured: `labelless search` takes it for another budget, from elsewhere,
    # clustering with the importance the run's sweep was weighted by
    assert json.loads((out / "sweep" / "sweep.json").read_text())["provenance"]["importance"]
    assert (out / "sweep" / "importance.safetensors").is_file()
    monkeypatch.chdir(tmp_path.parent)
    assert main(["search", str(out / "sweep"), "--smaller-by", "0.5", "-o", str(tmp_path / "half.yaml")]) == 0
    assert (tmp_path / "half.yaml").is_file()


def test_the_search_judges_plans_as_quantized_when_no_image_is_left_apart_from_the_sweeps(caplog):
    import dataclasses

    import torch

    from labelless import pipeline
    from labelless.models import ModelSpec
    from labelless.runconfig import DataSection, RunConfig, SweepSection

    # the sweep takes more than the 8x8 digits' 1,433 training images: none is left to retrain on
    config = RunConfig(sweep=SweepSection(limit=5000), data=dataclasses.replace(DataSection(), unlabeled="digits"))
    run = pipeline._Run(config, None, torch.device("cpu"), spec=ModelSpec("resnet18", in_channels=1, image_size=8))
    with caplog.at_level("WARNING", logger="labelless"):
        assert pipeline._after_retraining(run, None, None, None) is None
    assert any("judges plans as quantized" in r.getMessage() for r in caplog.records)


def test_run_without_labels_reads_none_and_reports_label_free_figures(tmp_path, capsys, monkeypatch):
    import labelless.data
    from labelless.models import ModelSpec, build_model, save_checkpoint

    spec = ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=16, mean=(0.5,), std=(0.25,))
    save_checkpoint(build_model(spec), tmp_path / "teacher.safetensors", spec)  # the user's own model
    opened = []
    real_open = labelless.data.open_images
    monkeypatch.setattr(labelless.data, "open_images", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    config = {
        "model": {"name": "resnet18", "image_size": 16, "weights": str(tmp_path / "teacher.safetensors")},
        "data": {"test": None, "unlabeled_limit": 96, "test_limit": 48},
        "sweep": {"clusters": [1, 16], "limit": 32, "importance": False},
        "search": {"max_drop": 25.0, "smaller_by": None, "after_retraining": 0},
        "quantize": {"compensate": False},
        "retrain": {"epochs": 1, "batch_size": 32, "min_holdout": 10, "refine_steps": 0},
        "out": str(tmp_path / "out"),
    }
    (tmp_path / "nolabels.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "nolabels.yaml")]) == 0
    assert opened and not any(k.get("labeled") for k in opened)  # no labelled set was even opened
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["labeled_data"] is None and "retrained_labeled" not in report
    assert not (out / "baseline.lless").exists()
    assert report["evaluation"] == {"data": "mnist", "split": "train", "images": 48, "labeled": False}
    for section in ("original", "quantized", "retrained_labelfree"):
        assert report[section]["accuracy"] is None and 0 <= report[section]["agreement"] <= 100
        assert report[section]["kl"] >= 0
    assert report["original"]["agreement"] == 100.0 and report["original"]["kl"] == pytest.approx(0, abs=1e-6)
    assert "no accuracy was measured" in capsys.readouterr().out
    assert "no accuracy was measured" in (out / "report.md").read_text()


def test_label_free_evaluation_images_are_held_apart_from_every_stage():
    import dataclasses

    import torch

    from labelless import pipeline
    from labelless.models import ModelSpec
    from labelless.runconfig import DataSection, RunConfig, SearchSection, SweepSection

    data = dataclasses.replace(DataSection(), unlabeled="digits", test=None, unlabeled_limit=300, test_limit=None)
    config = RunConfig(data=data, sweep=SweepSection(limit=200, importance_images=400),
                       search=SearchSection(retrain_images=150))
    run = pipeline._Run(config, None, torch.device("cpu"), spec=ModelSpec("resnet18", in_channels=1, image_size=8))
    held = pipeline._evaluation_set(run)
    draws = [labelless_open("digits", limit=n) for n in (300, 200, 400, 512)]  # retraining, sweep, importance,
    draws.append(labelless_open("digits", limit=150, after=200))  # compensation; the search's short retraining
    seen = {bytes(x.numpy()) for x in torch.cat(draws)}
    assert len(held) == len(labelless_open("digits")) - 512 and not any(bytes(x.numpy()) in seen for x in held_images(held))


def labelless_open(spec, **options):
    from labelless.data import open_images

    return open_images(spec, size=8, channels=1, seed=0, **options).images


def held_images(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_a_config_without_labels_is_checked_before_any_work():
    from labelless.errors import LabellessError
    from labelless.runconfig import RunConfig

    with pytest.raises(LabellessError, match="data.test is empty: give a dataset spec .null: no labelled evaluation"):
        RunConfig.from_data({"data": {"test": ""}})
    with pytest.raises(LabellessError, match="data.unlabeled_limit is null"):
        RunConfig.from_data({"data": {"test": None, "unlabeled_limit": None}})
    assert not RunConfig.from_data({"data": {"test": None}}).runs_baseline  # no labels: no baseline either
    assert not RunConfig.from_data({"data": {"baseline": None}}).runs_baseline
    assert RunConfig().runs_baseline


def test_an_original_near_chance_on_data_test_is_named(caplog):
    import torch

    from labelless import pipeline
    from labelless.models import ModelSpec

    run = pipeline._Run(pipeline.RunConfig(), None, torch.device("cpu"), spec=ModelSpec("resnet18", num_classes=10))
    with caplog.at_level("WARNING", logger="labelless"):
        pipeline._warn_if_chance(run, 80.0)
        assert not caplog.records
        pipeline._warn_if_chance(run, 18.4)  # a digits model scored on Fashion-MNIST, the default
    assert "scores 18.40% on data.test fashion-mnist (chance is 10.00%)" in caplog.records[0].getMessage()


def test_a_run_given_weights_feeds_the_normalisation_stored_in_them(tmp_path):
    import torch

    from labelless import pipeline
    from labelless.models import ModelSpec, build_model, save_checkpoint
    from labelless.runconfig import ModelSection, RunConfig

    spec = ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=16, mean=(0.25,), std=(0.5,))
    save_checkpoint(build_model(spec), tmp_path / "t.safetensors", spec)  # as `labelless train` and `run` write it
    given = ModelSection(image_size=16, weights=str(tmp_path / "t.safetensors"))
    run = pipeline._Run(RunConfig(model=given), tmp_path, torch.device("cpu"))
    pipeline._teacher(run)
    assert (run.spec.mean, run.spec.std) == ((0.25,), (0.5,))  # not ImageNet's, which it was never trained on
    mine = pipeline._Run(RunConfig(model=dataclasses.replace(given, mean=(0.1,), std=(0.2,))), tmp_path,
                         torch.device("cpu"))
    pipeline._teacher(mine)
    assert (mine.spec.mean, mine.spec.std) == ((0.1,), (0.2,))  # the config's own, when it gives them
