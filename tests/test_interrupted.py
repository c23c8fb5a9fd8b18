"""Interrupted work: SIGKILL ``labelless sweep``, ``retrain`` and ``run`` at random moments, run the
same command again, and get what an uninterrupted run gives.

Each scenario runs the command once to the end (the reference), then again in a fresh output
folder as ``python -m labelless ...`` subprocesses killed with SIGKILL after a delay drawn from a seeded
RNG (counted from the process's first log line, so that the kills land in the work rather than
in ``import torch``), and finally once more to completion. At every kill point each output file
that exists must parse completely (a ``.lless`` passes its checksums, JSON/CSV/YAML/PNG/
safetensors/checkpoints load); a kill may only leave ``.NAME.XXXX.tmp`` files, which nothing
reads. The final outputs must equal the reference's: ``sweep.csv`` row for row, every ``.lless``
model's outputs on fixed inputs bit for bit, and ``report.json`` / the retrain summary number
for number, timings aside.

The model is SqueezeNet 1.1 (0.7 M parameters, 24 px grayscale) on scikit-learn's 8x8 digits:
small enough that a scenario takes seconds, real enough to have 26 layers. ``LABELLESS_KILLS``
sets the number of kills per scenario (default 2); the ``slow`` test kills many more times.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

import labelless
from labelless.fileformat import read

MODEL = ["--model", "squeezenet1_1", "--num-classes", "10", "--in-channels", "1", "--image-size", "24"]
SPEC = labelless.ModelSpec("squeezenet1_1", num_classes=10, in_channels=1, image_size=24)
KILLS = int(os.environ.get("LABELLESS_KILLS", "2"))
TIMING_KEYS = {"timings", "seconds", "images_per_second"}
# numba's default OpenMP threading layer leaves libgomp threads spinning after k-means, which makes
# torch's CPU kernels 5-7x slower in the same process (docs/RELIABILITY.md); workqueue does not.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LABELLESS_PROGRESS="0", PYTHONUNBUFFERED="1",
           NUMBA_THREADING_LAYER=os.environ.get("NUMBA_THREADING_LAYER", "workqueue"))


@dataclass
class Scenario:
    """A command, its output folder, and how to compare two finished output folders."""

    name: str
    argv: Callable[[Path], list[str]]  # output folder -> arguments of `labelless`
    compare: Callable[[Path, Path], None]  # (reference folder, resumed folder)
    kill_points: list[dict[str, Any]] = field(default_factory=list)


# -- inputs shared by the scenarios ---------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A teacher checkpoint, a quantized student and a plan, made once."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    teacher = labelless.build_model(SPEC).eval()
    safetensors.torch.save_file(teacher.state_dict(), root / "teacher.safetensors")
    plan = [{"layers": "*", "weights": 4, "bias": 1}, {"layers": "1-3", "weights": None}]
    labelless.save(labelless.quantize(teacher, plan), root / "student.lless")
    return {"root": root, "teacher": root / "teacher.safetensors", "student": root / "student.lless"}


def _sweep_argv(inputs: dict[str, Path]) -> Callable[[Path], list[str]]:
    return lambda out: ["sweep", *MODEL, "--weights", str(inputs["teacher"]), "--unlabeled", "digits",
                        "--limit", "16", "--clusters", "1,4", "--batch-size", "16", "--device", "cpu",
                        "-o", str(out)]


def _retrain_argv(inputs: dict[str, Path]) -> Callable[[Path], list[str]]:
    return lambda out: ["retrain", str(inputs["student"]), "--weights", str(inputs["teacher"]), "--unlabeled",
                        "digits", "--limit", "96", "--epochs", "3", "--batch-size", "16", "--device", "cpu",
                        "--min-holdout", "5", "-o", str(out / "retrained.lless")]


def _run_argv(inputs: dict[str, Path]) -> Callable[[Path], list[str]]:
    def argv(out: Path) -> list[str]:
        config = {
            "model": {"name": "squeezenet1_1", "num_classes": 10, "in_channels": 1, "image_size": 24},
            "teacher": {"data": "digits", "limit": 96, "train": {"epochs": 1, "batch_size": 16}},
            "data": {"unlabeled": "digits", "unlabeled_limit": 64, "test": "digits", "test_limit": 32,
                     "baseline": "digits", "baseline_limit": 32},
            "sweep": {"clusters": [1, 4], "limit": 16, "batch_size": 16},
            "search": {"max_drop": 10.0, "smaller_by": None, "after_retraining": 0},
            "retrain": {"epochs": 2, "batch_size": 16, "min_holdout": 1, "refine_steps": 0},  # 6 of 64 images held out
            "storage": {"entropy": "ans"},
            "device": "cpu",
            "out": str(out),
        }
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["run", str(path)]
    return argv


# -- every output file that exists parses completely ---------------------------------------------


def _check_lless(path: Path) -> None:
    read(path)  # header, every tensor, both checksums


def _check_jsonl(path: Path) -> None:
    """The sweep journal: only a last line cut short by the kill may fail to parse."""
    text = path.read_text()
    complete = text.split("\n")[:-1]  # what precedes the last newline
    for line in complete:
        json.loads(line)


def _check_csv(path: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert rows and all(None not in row and all(v is not None for v in row.values()) for row in rows), path


def _check_png(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


CHECKS: dict[str, Callable[[Path], Any]] = {
    ".lless": _check_lless,
    ".json": lambda p: json.loads(p.read_text()),
    ".jsonl": _check_jsonl,
    ".csv": _check_csv,
    ".yaml": lambda p: yaml.safe_load(p.read_text()),
    ".safetensors": lambda p: safetensors.torch.load_file(p),
    ".png": _check_png,
    ".ckpt": lambda p: torch.load(p, map_location="cpu", weights_only=True),
    ".md": lambda p: p.read_text().endswith("\n") or pytest.fail(f"{p} is cut short"),
}


def assert_outputs_parse(folder: Path) -> dict[str, int]:
    """Parse every finished file under ``folder``; count them, and the temporary files left by a kill."""
    counts = {"files": 0, "tmp": 0}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            counts["tmp"] += 1
            continue
        check = CHECKS.get(path.suffix)
        assert check is not None, f"unexpected output {path}"
        try:
            check(path)
        except Exception as exc:  # noqa: BLE001 - any failure to parse is the failure under test
            pytest.fail(f"{path} does not parse after a kill: {type(exc).__name__}: {exc}")
        counts["files"] += 1
    return counts


# -- kill, resume, compare ----------------------------------------------------------------------


def _launch(argv: list[str]) -> tuple[subprocess.Popen, threading.Event, list[str]]:
    """Start ``python -m labelless argv``; the event is set at its first line on stderr."""
    process = subprocess.Popen([sys.executable, "-m", "labelless", *argv], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    started, lines = threading.Event(), []

    def drain() -> None:
        for line in process.stderr:
            lines.append(line)
            started.set()
        started.set()

    threading.Thread(target=drain, daemon=True).start()
    return process, started, lines


def kill_at_random(argv: list[str], rng: random.Random, work_seconds: float) -> dict[str, Any]:
    """Run, and SIGKILL after a random share of ``work_seconds`` once the work has begun."""
    process, started, lines = _launch(argv)
    started.wait(timeout=120)
    delay = rng.uniform(0.05, 0.8) * work_seconds
    try:
        process.wait(timeout=delay)
        outcome = "finished first"
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcome = "killed"
    assert outcome == "killed" or process.returncode == 0, "".join(lines)
    return {"delay_s": round(delay, 2), "outcome": outcome}


def run_to_completion(argv: list[str]) -> float:
    """Run to the end; return the seconds from its first log line (the work, not the imports)."""
    process, started, lines = _launch(argv)
    started.wait(timeout=120)
    start = time.perf_counter()
    assert process.wait(timeout=600) == 0, "".join(lines)
    return time.perf_counter() - start


def exercise(scenario: Scenario, tmp_path: Path, kills: int, seed: int) -> Scenario:
    """An uninterrupted reference run, ``kills`` random SIGKILLs, a final run; then compare.

    The reference runs as a subprocess too: results are bit-identical only under the same
    thread settings (OpenMP picks kernels by its thread count at start-up).
    """
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference.mkdir()
    resumed.mkdir()
    work_seconds = run_to_completion(scenario.argv(reference))
    rng = random.Random(seed)
    for _ in range(kills):
        point = kill_at_random(scenario.argv(resumed), rng, work_seconds)
        if resumed.exists():
            point.update(assert_outputs_parse(resumed))
        scenario.kill_points.append(point)
    run_to_completion(scenario.argv(resumed))
    assert_outputs_parse(resumed)
    scenario.compare(reference, resumed)
    _log(scenario, work_seconds)
    return scenario


def _log(scenario: Scenario, work_seconds: float) -> None:
    """Append the kill points to ``$LABELLESS_KILL_LOG`` (JSON lines), for docs/RELIABILITY.md."""
    if os.environ.get("LABELLESS_KILL_LOG"):
        with open(os.environ["LABELLESS_KILL_LOG"], "a") as handle:
            handle.write(json.dumps({"scenario": scenario.name, "reference_s": round(work_seconds, 2),
                                     "kill_points": scenario.kill_points}) + "\n")


# -- comparisons -----------------------------------------------------------------------------------


def without_timings(data: Any) -> Any:
    """JSON data with every timing (seconds, images per second, stage times) removed."""
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k not in TIMING_KEYS}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def assert_same_model(a: Path, b: Path) -> None:
    x = torch.rand(8, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(labelless.load(a)(x), labelless.load(b)(x)), f"{a} and {b} differ"


def compare_sweep(reference: Path, resumed: Path) -> None:
    assert (reference / "sweep.csv").read_text() == (resumed / "sweep.csv").read_text()
    assert _sweep_json(reference) == _sweep_json(resumed)


def _sweep_json(folder: Path) -> dict:
    """``sweep.json`` but for the path of the weights swept (a run's own teacher lies in its own
    folder); the digest of those weights stays in the comparison."""
    data = json.loads((folder / "sweep.json").read_text())
    data["provenance"]["data"].pop("weights")
    return data


def compare_retrain(reference: Path, resumed: Path) -> None:
    assert_same_model(reference / "retrained.lless", resumed / "retrained.lless")
    summaries = [json.loads((folder / "retrained.lless.json").read_text()) for folder in (reference, resumed)]
    assert without_timings(summaries[0]) == without_timings(summaries[1])


def compare_run(reference: Path, resumed: Path) -> None:
    reports = [json.loads((folder / "report.json").read_text()) for folder in (reference, resumed)]
    assert without_timings(reports[0]) == without_timings(reports[1])
    for name in ("quantized.lless", "model.lless", "baseline.lless"):
        assert_same_model(reference / name, resumed / name)
    compare_sweep(reference / "sweep", resumed / "sweep")
    assert (reference / "plan.yaml").read_text() == (resumed / "plan.yaml").read_text()


SCENARIOS = {"sweep": (_sweep_argv, compare_sweep), "retrain": (_retrain_argv, compare_retrain),
             "run": (_run_argv, compare_run)}


@pytest.mark.parametrize("name", SCENARIOS)
def test_killed_command_resumes_to_the_uninterrupted_result(tmp_path, inputs, name):
    make_argv, compare = SCENARIOS[name]
    scenario = exercise(Scenario(name, make_argv(inputs), compare), tmp_path, KILLS, seed=sorted(SCENARIOS).index(name))
    assert len(scenario.kill_points) == KILLS


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_many_kills_in_a_row_still_resume_to_the_same_result(tmp_path, inputs, name):
    make_argv, compare = SCENARIOS[name]
    scenario = exercise(Scenario(name, make_argv(inputs), compare), tmp_path, kills=8, seed=100 + len(name))
    killed = sum(point["outcome"] == "killed" for point in scenario.kill_points)
    assert killed >= 4, scenario.kill_points  # most attempts must really be cut short
