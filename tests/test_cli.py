"""The command line: each sub-command end to end, errors as one line and nothing half-written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch

from labelless.cli import main

MODEL = ["--model", "resnet18", "--num-classes", "10", "--in-channels", "1", "--small-input"]


@pytest.fixture
def checkpoint(tmp_path, model):
    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    return path


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text('- layers: "*"\n  weights: 16\n  bias: 1\n')
    return path


def test_layers_prints_the_numbering(capsys):
    assert main(["layers", *MODEL, "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert [l["index"] for l in layers] == list(range(1, 22))
    assert layers[0]["name"] == "conv1" and layers[-1]["type"] == "Linear"
    assert main(["layers", "--model", "vgg16"]) == 0
    assert "14  classifier.0" in capsys.readouterr().out


def test_quantize_inspect_decompress(tmp_path, checkpoint, plan_file, capsys, model):
    out = tmp_path / "m.lless"
    assert main(["quantize", *MODEL, "--weights", str(checkpoint), "--plan", str(plan_file), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_bytes"] == out.stat().st_size
    assert 0.8 < report["size_reduction"] < 1
    assert {"index", "name", "n_params", "weights_clusters", "bias_clusters", "bytes"} <= set(report["layers"][0])
    dense = tmp_path / "dense.safetensors"
    assert main(["decompress", str(out), "-o", str(dense)]) == 0
    state = safetensors.torch.load_file(dense)
    assert set(state) == set(model.state_dict())
    assert state["conv1.weight"].unique().numel() <= 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "{plan}", "--weights", "{tmp}/missing.pt"], "does not exist"),
        (["--plan", "{tmp}/none.yaml", "--weights", "{ckpt}"], "does not exist"),
        (["--plan", "{bad}", "--weights", "{ckpt}"], "out of range"),
    ],
)
def test_bad_input_fails_with_one_line_and_no_output(tmp_path, checkpoint, plan_file, capsys, args, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text('- layers: "40"\n  weights: 4\n')
    fill = {"plan": plan_file, "tmp": tmp_path, "ckpt": checkpoint, "bad": bad}
    out = tmp_path / "out.lless"
    code = main(["quantize", *MODEL, *[a.format(**fill) for a in args], "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.lless*"))


def test_wrong_architecture_and_missing_output_folder(tmp_path, checkpoint, plan_file, capsys):
    code = main(["quantize", "--model", "resnet18", "--num-classes", "100", "--in-channels", "1", "--small-input",
                 "--weights", str(checkpoint), "--plan", str(plan_file), "-o", str(tmp_path / "o.lless")])
    assert code == 2 and "does not fit resnet18" in capsys.readouterr().err
    code = main(["quantize", *MODEL, "--weights", str(checkpoint), "--plan", str(plan_file), "-o", str(tmp_path / "no" / "o.lless")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point_exists():
    import labelless.__main__  # noqa: F401


@pytest.mark.parametrize("given, expected", [((), (0.3,)), (("--mean", "0.5", "--std", "0.2"), (0.5,))])
def test_quantize_uses_the_normalisation_stored_with_the_teacher(tmp_path, model, plan_file, given, expected):
    from labelless import ModelSpec, load
    from labelless.models import save_checkpoint

    checkpoint = tmp_path / "teacher.safetensors"
    save_checkpoint(model, checkpoint, ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True,
                                                 mean=(0.3,), std=(0.4,)))
    out = tmp_path / "m.lless"
    assert main(["quantize", *MODEL, *given, "--weights", str(checkpoint), "--plan", str(plan_file), "-o", str(out)]) == 0
    assert load(out).labelless_spec.mean == expected


@pytest.mark.parametrize("given, warned", [((), True), (("--mean", "0.5", "--std", "0.2"), False)])
def test_a_checkpoint_without_normalisation_is_named_unless_mean_and_std_are_given(tmp_path, model, plan_file, caplog,
                                                                                   given, warned):
    checkpoint = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), checkpoint)
    with caplog.at_level("WARNING", logger="labelless"):
        assert main(["quantize", *MODEL, *given, "--weights", str(checkpoint), "--plan", str(plan_file),
                     "-o", str(tmp_path / "m.lless")]) == 0
    assert ("teacher.pt stores no normalisation" in caplog.text) == warned


def test_quantize_with_unlabeled_images_weights_the_kmeans_by_importance(tmp_path, checkpoint, capsys):
    from labelless import load

    plan = tmp_path / "plan.yaml"
    plan.write_text('- layers: "*"\n  weights: 2\n  granularity: per_channel\n')
    argv = ["quantize", *MODEL, "--weights", str(checkpoint), "--plan", str(plan)]
    assert main([*argv, "-o", str(tmp_path / "plain.lless")]) == 0
    assert main([*argv, "-o", str(tmp_path / "fisher.lless"), "--unlabeled", "digits", "--limit", "16"]) == 0
    plain, fisher = load(tmp_path / "plain.lless"), load(tmp_path / "fisher.lless")
    assert not torch.equal(plain.conv1.weight, fisher.conv1.weight)  # other centroids
    assert (tmp_path / "plain.lless").stat().st_size == (tmp_path / "fisher.lless").stat().st_size  # same bytes
    assert fisher.layer1[0].conv1.weight[0].unique().numel() <= 2  # per channel
    code = main([*argv, "-o", str(tmp_path / "x.lless"), "--unlabeled", "images:/no/such/folder"])
    assert code == 2 and "does not exist" in capsys.readouterr().err and not (tmp_path / "x.lless").exists()
    for flag in ("--correct-bn", "--compensate"):
        code = main([*argv, "-o", str(tmp_path / "x.lless"), flag])
        assert code == 2 and f"{flag} needs --unlabeled" in capsys.readouterr().err


def test_quantize_can_correct_batchnorm_statistics_on_the_unlabeled_images(tmp_path, checkpoint, plan_file):
    from labelless import load

    argv = ["quantize", *MODEL, "--weights", str(checkpoint), "--plan", str(plan_file), "--unlabeled", "digits",
            "--limit", "16"]
    assert main([*argv, "-o", str(tmp_path / "a.lless")]) == 0
    assert main([*argv, "-o", str(tmp_path / "b.lless"), "--correct-bn"]) == 0
    plain, corrected = load(tmp_path / "a.lless"), load(tmp_path / "b.lless")
    assert torch.equal(plain.conv1.weight, corrected.conv1.weight)  # the same codebooks and indices
    assert not torch.equal(plain.bn1.running_mean, corrected.bn1.running_mean)


def test_quantize_can_compensate_the_indices_on_the_unlabeled_images(tmp_path, checkpoint, plan_file):
    from labelless import load, quantized_tensors

    argv = ["quantize", *MODEL, "--weights", str(checkpoint), "--plan", str(plan_file), "--unlabeled", "digits",
            "--limit", "16"]
    assert main([*argv, "-o", str(tmp_path / "a.lless")]) == 0
    assert main([*argv, "-o", str(tmp_path / "b.lless"), "--compensate"]) == 0
    plain, compensated = (quantized_tensors(load(tmp_path / f)) for f in ("a.lless", "b.lless"))
    assert all(torch.equal(plain[k].centroids, compensated[k].centroids) for k in plain)  # the same codebooks
    assert any(not torch.equal(plain[k].indices, compensated[k].indices) for k in plain)  # other indices
    assert (tmp_path / "a.lless").stat().st_size == (tmp_path / "b.lless").stat().st_size


def test_every_retrain_config_field_is_a_flag_of_retrain():
    import argparse
    import dataclasses

    from labelless.cli.retrain import add_retrain_args, retrain_config
    from labelless.retrain import RetrainConfig

    parser = argparse.ArgumentParser()
    add_retrain_args(parser)
    assert retrain_config(parser.parse_args([])) == RetrainConfig()
    changed = {"epochs": 3, "lr": 0.01, "weight_decay": 0.1, "batch_size": 7, "loss": "mse", "temperature": 2.0,
               "bn": "update", "balance": False, "cutmix": 0.25, "holdout": 0.2, "min_holdout": 50, "tune_centroids": True,
               "centroid_lr": 0.001, "refine_steps": 5, "features": 0.5, "seed": 3, "amp": False,
               "channels_last": False}
    assert set(changed) == {f.name for f in dataclasses.fields(RetrainConfig)}
    argv = []
    for name, value in changed.items():
        flag = "--" + name.replace("_", "-")
        argv += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    assert retrain_config(parser.parse_args(argv)) == RetrainConfig(**changed)


def test_print_config_is_a_complete_commented_config_that_reads_back(tmp_path, capsys):
    import yaml

    from labelless.pipeline import RunConfig

    assert main(["run", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert RunConfig.from_data(yaml.safe_load(text)) == RunConfig()
    assert all("  # " in line for line in text.splitlines())  # every field says what it is
    mine = tmp_path / "mine.yaml"
    mine.write_text("search: {max_drop: null, smaller_by: 0.93}\n")
    assert main(["run", str(mine), "--out", str(tmp_path / "o"), "--print-config"]) == 0
    resolved = RunConfig.from_data(yaml.safe_load(capsys.readouterr().out))
    assert resolved.search.smaller_by == 0.93 and resolved.out == str(tmp_path / "o")
    assert not (tmp_path / "o").exists()  # printing runs nothing


def test_a_section_given_in_part_keeps_the_runs_defaults_for_the_rest():
    from labelless.pipeline import RunConfig

    default = RunConfig()
    # the run's retraining refines 20 steps for 5 epochs and its teacher trains 4 epochs, unlike the
    # sections' own class defaults: a partial section must not fall back to those
    assert (default.retrain.refine_steps, default.teacher.train.epochs) != (0, 2)
    config = RunConfig.from_data({"retrain": {"lr": 0.001}, "teacher": {"train": {"batch_size": 64}}})
    assert config.retrain == dataclasses.replace(default.retrain, lr=0.001)
    assert config.teacher.train == dataclasses.replace(default.teacher.train, batch_size=64)
    assert config.model == default.model and config.sweep == default.sweep


def test_train_without_image_size_trains_at_the_datas_own_size(tmp_path, caplog):
    out = tmp_path / "t.safetensors"
    with caplog.at_level("INFO", logger="labelless"):
        assert main(["train", "--model", "resnet18", "--num-classes", "10", "--in-channels", "1", "--small-input",
                     "--data", "digits", "--limit", "32", "--epochs", "1", "--device", "cpu", "-o", str(out)]) == 0
    assert json.loads(out.with_name("t.safetensors.json").read_text())["spec"]["image_size"] == 8  # digits are 8x8
    assert "image size 8 px, from digits" in caplog.text


@pytest.mark.parametrize("best_epoch, labeled, expected", [
    (2, True, "won back +3.00, and lands -1.00 points from labelled retraining."),
    (0, False, "won back +0.00 (no epoch beat the start on the held-out images, so the quantized model was kept)."),
])
def test_the_recovery_line_says_what_retraining_won_back(best_epoch, labeled, expected):
    from labelless.report import recovery, recovery_line

    free = 83.0 if best_epoch else 80.0
    report = {"original": {"accuracy": 85.0}, "quantized": {"accuracy": 80.0},
              "retrained_labelfree": {"accuracy": free, "best_epoch": best_epoch}}
    if labeled:
        report["retrained_labeled"] = {"accuracy": 84.0}
    line = recovery_line(report)
    assert line.startswith("Quantization cost 5.00 points of accuracy; label-free") and line.endswith(expected)
    points = recovery(report)  # report.json's "recovery": the same figures
    assert points["lost"] == 5.0 and points["won_back"] == free - 80.0 and points["from_original"] == free - 85.0
    assert points["from_labeled"] == (free - 84.0 if labeled else None) and points["metric"] == "accuracy"


def test_without_labels_the_recovery_line_is_in_agreement_and_says_no_accuracy_was_measured():
    from labelless.report import recovery_line

    report = {"original": {"accuracy": None, "agreement": 100.0}, "quantized": {"accuracy": None, "agreement": 91.0},
              "retrained_labelfree": {"accuracy": None, "agreement": 96.5, "best_epoch": 1}}
    assert recovery_line(report) == ("Quantization cost 9.00 points of agreement with the original (no accuracy was "
                                     "measured); label-free retraining won back +5.50.")


def test_models_lists_what_model_accepts_and_the_unknown_model_error_points_there(capsys):
    assert main(["models", "--json"]) == 0
    names = json.loads(capsys.readouterr().out)
    assert {"resnet18", "vgg16_bn", "mobilenet_v2"} <= set(names) and names == sorted(names)
    assert main(["layers", "--model", "resnet1"]) == 2
    assert "`labelless models`" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_work_before_or_after_the_command(where, caplog):
    import logging

    flag = ["-q"]
    argv = [*flag, "models"] if where == "before" else ["models", *flag]
    assert main(argv) == 0
    assert logging.getLogger("labelless").level == logging.WARNING
    assert main(["models", "-v"]) == 0 and logging.getLogger("labelless").level == logging.DEBUG


def test_flag_spellings_are_the_same_across_commands():
    from labelless.cli import build_parser

    parser = build_parser()
    sweep = parser.parse_args(["sweep", *MODEL, "--weights", "w", "--unlabelled", "mnist", "--eval", "fashion-mnist",
                               "-o", "s"])
    assert (sweep.unlabeled, sweep.labeled) == ("mnist", "fashion-mnist")
    retrain = parser.parse_args(["retrain", "m.lless", "--weights", "w", "--unlabelled", "mnist", "-o", "r.lless"])
    assert retrain.unlabeled == "mnist"
    assert parser.parse_args(["run", "-o", "out"]).out == "out"


def test_help_states_the_defaults_actually_used(capsys):
    from labelless.train import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"images per batch (default {TrainConfig.batch_size})" in text
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE cpu, cuda" in text and "--metric {agreement,balanced,accuracy} agreement with" in text


def test_retrain_with_the_wrong_teacher_names_what_to_give_not_flags_it_lacks(tmp_path, checkpoint, plan_file, capsys):
    model = tmp_path / "m.lless"
    assert main(["quantize", *MODEL, "--weights", str(checkpoint), "--plan", str(plan_file), "-o", str(model)]) == 0
    other = tmp_path / "other.safetensors"
    import labelless

    wrong = labelless.build_model(labelless.ModelSpec("resnet18", num_classes=7, in_channels=1, small_input=True))
    safetensors.torch.save_file(wrong.state_dict(), other)
    capsys.readouterr()
    code = main(["retrain", str(model), "--weights", str(other), "--unlabeled", "digits", "-o", str(tmp_path / "r.lless")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit resnet18" in err and f"the checkpoint {model} was quantized from" in err
    assert "--num-classes" not in err and not (tmp_path / "r.lless").exists()


def test_search_writes_plan_files_only_and_says_when_the_additive_prediction_is_past_meaning(tmp_path, capsys):
    from labelless.cli.search import _points

    assert main(["search", str(tmp_path), "--max-drop", "1", "-o", str(tmp_path / "p.txt")]) == 2
    assert ".yaml, .yml or .json" in capsys.readouterr().err and not (tmp_path / "p.txt").exists()
    assert _points(1080.08) == "over 100" and _points(0.5) == "0.50"
