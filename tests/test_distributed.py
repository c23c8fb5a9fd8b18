"""Under torchrun: two CPU processes (gloo) give the single-process sweep table, retrain with one
set of outputs, resume with another number of processes, and stop together on a non-finite loss.

Each torchrun call starts the user's command, ``torchrun --standalone --nproc-per-node 2 -m
labelless ...``, on a ResNet-18 sized for 16 px grayscale digits, with few images.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import labelless
from labelless import distributed
from labelless.cli import main

MODEL = ["--model", "resnet18", "--num-classes", "10", "--in-channels", "1", "--image-size", "16"]
SWEEP = ["--unlabeled", "digits", "--limit", "8", "--clusters", "1,4", "--no-bias", "--batch-size", "8"]
RETRAIN = ["--unlabeled", "digits", "--limit", "160", "--batch-size", "32", "--cutmix", "0", "--lr", "3e-3",
           "--min-holdout", "16"]  # 16 of 160 images held out
TIMEOUT = 240  # seconds; a deadlock shows as a timeout, not as a hung test run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m labelless ARGS``, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "labelless", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", LABELLESS_PROGRESS="0", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and the workers it started
        out, err = process.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s (deadlock?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("."))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A seeded ResNet-18 (the teacher) and its quantized copy (the student)."""
    folder = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    spec = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=16)
    safetensors.torch.save_file(labelless.build_model(spec).state_dict(), folder / "teacher.safetensors")
    (folder / "plan.yaml").write_text('- layers: "1-20"\n  weights: 4\n')
    assert main(["quantize", *MODEL, "--weights", str(folder / "teacher.safetensors"), "--plan",
                 str(folder / "plan.yaml"), "-o", str(folder / "student.lless")]) == 0
    return folder


def test_two_processes_sweep_the_same_table_as_one(work):
    weights = ["--weights", str(work / "teacher.safetensors")]
    assert main(["sweep", *MODEL, *weights, *SWEEP, "-o", str(work / "one")]) == 0
    run = torchrun("sweep", *MODEL, *weights, *SWEEP, "-o", "two", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((work / name / "sweep.json").read_text()) for name in ("one", "two"))
    assert [(r["layer"], r["tensor"], r["k"], r["bytes"]) for r in two["rows"]] == \
           [(r["layer"], r["tensor"], r["k"], r["bytes"]) for r in one["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert b["agreement"] == pytest.approx(a["agreement"]) and b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
    journal = (work / "two" / "rows.jsonl").read_text().splitlines()
    assert len(journal) == 1 + len(one["rows"])  # each row journaled once, by rank 0
    assert sorted(p.name for p in (work / "two").iterdir()) == sorted(p.name for p in (work / "one").iterdir())
    assert not leftovers(work / "two") and run.stdout.count("swept ") == 1


@pytest.fixture(scope="module")
def retrained(work):
    run = torchrun("retrain", "student.lless", "--weights", "teacher.safetensors", *RETRAIN, "--epochs", "2",
                   "--checkpoint-dir", "ckpt", "-o", "out2.lless", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_processes_retrain_and_write_one_set_of_outputs(work, retrained):
    summary = json.loads((work / "out2.lless.json").read_text())
    losses = [epoch["loss"] for epoch in summary["history"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    best = summary["before"] if summary["best_epoch"] == 0 else summary["history"][summary["best_epoch"] - 1]
    assert summary["after"] == {k: best[k] for k in summary["after"]}  # the kept epoch's figures
    assert sorted(p.name for p in work.glob("out2*")) == ["out2.lless", "out2.lless.config.json", "out2.lless.json"]
    assert [p.name for p in (work / "ckpt").iterdir()] == ["retrain-labelfree.ckpt"]
    assert not leftovers(work) and retrained.stdout.count("wrote ") == 1
    model = labelless.load(work / "out2.lless")
    assert set(labelless.quantized_tensors(model)) == set(labelless.quantized_tensors(labelless.load(work / "student.lless")))


def test_a_checkpoint_of_two_processes_resumes_in_one(work, retrained, caplog):
    saved = torch.load(work / "ckpt" / "retrain-labelfree.ckpt", weights_only=True)
    assert saved["world_size"] == 2 and saved["epoch"] == 2
    assert not any(key.startswith("module.") for key in saved["current"])
    with caplog.at_level("INFO", logger="labelless"):
        assert main(["retrain", str(work / "student.lless"), "--weights", str(work / "teacher.safetensors"), *RETRAIN,
                     "--epochs", "3", "--checkpoint-dir", str(work / "ckpt"), "-o", str(work / "out1.lless")]) == 0
    assert "resuming labelfree retraining after epoch 2" in caplog.text
    two = json.loads((work / "out2.lless.json").read_text())["history"]
    history = json.loads((work / "out1.lless.json").read_text())["history"]
    assert history[:2] == two and [epoch["epoch"] for epoch in history] == [1, 2, 3]


def test_a_non_finite_loss_stops_every_rank_with_the_same_error(work):
    run = torchrun("retrain", "student.lless", "--weights", "teacher.safetensors", *RETRAIN, "--epochs", "2",
                   "--lr", "1e30", "--checkpoint-dir", "ckpt-nan", "-o", "nan.lless", cwd=work)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("labelless: error:")]
    # every rank raises the same error at the same step; torchrun stops the others once the first has exited
    assert errors and all(re.match(r"labelless: error: \[rank [01]\] the loss became", line) for line in errors)
    assert re.search(r"exitcode\s*:\s*2\b", run.stderr), run.stderr[-3000:]  # a clean exit, not a crash
    assert not (work / "nan.lless").exists() and not leftovers(work)


ALONE = """
import torch
from labelless import distributed

def inside():  # what the search's short retrainings do on rank 0 while the others wait
    linear = torch.nn.Linear(2, 2)
    distributed.broadcast_state(linear)
    return distributed.world_size(), distributed.wrap(linear, torch.device("cpu")) is linear

with distributed.session():
    found = distributed.on_main(inside)
    print(f"rank {distributed.rank()}: inside {found}, after {distributed.world_size()}", flush=True)
"""


def test_on_main_runs_rank_0_as_a_group_of_one_without_deadlock(tmp_path):
    (tmp_path / "alone.py").write_text(ALONE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "alone.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(command, cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=90)  # a deadlock shows as a timeout
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(re.findall(r"rank \d: .*", run.stdout)) == ["rank 0: inside (1, True), after 2",
                                                               "rank 1: inside (1, True), after 2"]


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the Fashion-MNIST package")
def test_labelless_run_under_torchrun_searches_on_rank_0_and_finishes_on_every_rank(tmp_path):
    import yaml

    config = {  # the smallest run whose search calibrates each plan and retrains one on rank 0 alone
        "model": {"name": "resnet18", "image_size": 16},
        "teacher": {"limit": 128, "train": {"epochs": 1, "batch_size": 64}},
        "data": {"unlabeled_limit": 64, "test_limit": 64, "baseline": None},
        "sweep": {"clusters": [1, 16], "limit": 32, "include_bias": False, "importance_images": 32},
        "search": {"max_drop": 25.0, "smaller_by": None, "after_retraining": 1, "retrain_images": 64},
        "quantize": {"compensate": False, "correct_bn": True, "images": 32},  # cheaper than compensating
        "retrain": {"epochs": 1, "batch_size": 32, "holdout": 0.25, "min_holdout": 8, "refine_steps": 1},
        "out": str(tmp_path / "out"),
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    run = torchrun("run", "tiny.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["search"]["retrained_drop"] is not None and report["retrained_labelfree"]["bytes"] > 0
    assert not leftovers(tmp_path / "out")
    # again: rank 0 reads the refined images back and hands them to rank 1, to the same retrained model
    (tmp_path / "out" / "checkpoints" / "retrain-labelfree.ckpt").unlink()
    again = torchrun("run", "tiny.yaml", cwd=tmp_path)
    assert again.returncode == 0 and "refined earlier" in again.stderr, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rerun["retrained_labelfree"]["agreement"] == report["retrained_labelfree"]["agreement"]


def test_without_torchrun_every_helper_is_a_no_op(tiny):
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    rows = [{"k": 1}]
    assert distributed.broadcast_object(rows) is rows and distributed.gather_objects(rows) == [rows]
    order = torch.randperm(10)
    assert distributed.sampler_shard(order) is order and distributed.block(10) == slice(0, 10)
    assert distributed.wrap(tiny, torch.device("cpu")) is tiny
    assert distributed.on_main(lambda: 42) == 42


def test_commands_that_cannot_share_their_work_refuse_to_run_under_torchrun(monkeypatch, capsys, request):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    logger = logging.getLogger("labelless")
    request.addfinalizer(lambda level=logger.level: logger.setLevel(level))  # main quiets rank 1's logging
    assert main(["layers", "--model", "resnet18"]) == 2
    assert "labelless: error: [rank 1] `labelless layers` does not split" in capsys.readouterr().err
