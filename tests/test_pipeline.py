"""labelless run end to end on a tiny config: every file and every report field."""

from __future__ import annotations

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
    "retrain": {"epochs": 1, "batch_size": 64, "min_holdout": 10},  # 13 of 128 images held out
}


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the Fashion-MNIST package")
def test_run_writes_model_report_sweep_and_config(tmp_path, capsys, caplog):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, out=str(tmp_path / "out"))))
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
    assert len(rescored) == 2 and report["search"]["retrained_drop"] == searched["best"]["retrained_drop"]
    assert searched["best"]["retrained_drop"] <= 25.0 or searched["best"]["bytes"] == max(c["bytes"] for c in rescored)
    printed = capsys.readouterr().out
    assert "retrained_labelfree" in printed and "size reduction" in printed
    won = report["retrained_labelfree"]["accuracy"] - report["quantized"]["accuracy"]
    assert f"label-free retraining won back {won:+.2f}" in printed  # the recovery, said in points
    assert f"won back {won:+.2f}" in (out / "report.md").read_text()
    plan = (out / "plan.yaml").read_text()
    with caplog.at_level("INFO", logger="labelless"):
        assert main(["run", str(config)]) == 0  # again: teacher, sweep and search reused
    assert any("reusing the plan searched earlier" in r.getMessage() for r in caplog.records)
    again = json.loads((out / "report.json").read_text())
    assert (out / "plan.yaml").read_text() == plan and again["search"] == report["search"]
    assert again["quantized"]["accuracy"] == report["quantized"]["accuracy"]


def test_the_search_judges_plans_as_quantized_when_no_image_is_left_apart_from_the_sweeps(caplog):
    import dataclasses

    import torch

    from labelless import pipeline
    from labelless.models import ModelSpec
    from labelless.runconfig import DataSection, RunConfig, SweepSection

    # the sweep takes more than the 8x8 digits' 1,437 training images: none is left to retrain on
    config = RunConfig(sweep=SweepSection(limit=5000), data=dataclasses.replace(DataSection(), unlabeled="digits"))
    run = pipeline._Run(config, None, torch.device("cpu"), spec=ModelSpec("resnet18", in_channels=1, image_size=8))
    with caplog.at_level("WARNING", logger="labelless"):
        assert pipeline._after_retraining(run, None, None, None) is None
    assert any("judges plans as quantized" in r.getMessage() for r in caplog.records)
