"""Untrusted checkpoints: labelless never runs code from a .pt file.

A pickle can call any function while it is read. Each malicious checkpoint here would
create a file if it were unpickled; labelless must refuse it with a one-line message, through
the Python API and the CLI, and leave no trace: no created file, no output .lless.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import labelless
from labelless import ModelError
from labelless.cli import main


class _System:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Open:
    """Unpickling calls ``open(path, "w")``, which creates the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class _Eval:
    """Unpickling calls ``eval`` on Python source."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


def _payloads(marker: str) -> dict:
    """Objects whose unpickling creates ``marker``."""
    return {
        "os.system": _System(f"touch {marker}"),
        "open": _Open(marker),
        "eval": _Eval(f"open({marker!r}, 'w')"),
        "hidden-in-a-state-dict": {"state_dict": {"weight": torch.zeros(2)}, "extra": _Open(marker)},
    }


def _write(kind: str, payload, path) -> None:
    if kind == "zip":  # what torch.save writes today
        torch.save(payload, path)
    elif kind == "legacy":  # torch's pre-1.6 format
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle named .pt
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)


PAYLOADS = sorted(_payloads("x"))
FORMATS = ["zip", "legacy", "raw-pickle"]


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps([{"layers": "*", "weights": 16, "bias": 1}]))
    return path


def _quantize_args(weights, plan, output) -> list[str]:
    return ["quantize", "--model", "resnet18", "--num-classes", "10", "--in-channels", "1", "--small-input",
            "--weights", str(weights), "--plan", str(plan), "-o", str(output)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_checkpoint_is_refused_by_the_api_and_runs_nothing(tmp_path, payload, fmt):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _write(fmt, _payloads(str(marker))[payload], evil)
    with pytest.raises(ModelError, match="refused to load.*never runs code from a checkpoint") as info:
        labelless.load_state_dict_file(evil)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", ["os.system", "open"])
def test_malicious_checkpoint_is_refused_by_the_cli_and_runs_nothing(tmp_path, plan_file, capsys, payload, fmt):
    marker, evil, output = tmp_path / "pwned", tmp_path / "evil.pt", tmp_path / "out.lless"
    _write(fmt, _payloads(str(marker))[payload], evil)
    code = main(_quantize_args(evil, plan_file, output))
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("labelless: error: ") and "refused to load" in err
    assert not marker.exists()
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.lless")]  # no temporary file either


def test_pickled_whole_module_is_refused(tmp_path, tiny, plan_file, capsys):
    torch.save(tiny, tmp_path / "module.pt")
    with pytest.raises(ModelError, match="refused to load.*re-save it as model.state_dict"):
        labelless.load_state_dict_file(tmp_path / "module.pt")
    assert main(_quantize_args(tmp_path / "module.pt", plan_file, tmp_path / "out.lless")) != 0
    assert "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "out.lless").exists()


@pytest.mark.parametrize("wrap", [
    lambda state: state,
    lambda state: {"state_dict": state},
    lambda state: {f"module.{key}": value for key, value in state.items()},
    lambda state: {"model": {f"module.{key}": value for key, value in state.items()}, "epoch": 3},
], ids=["plain", "state_dict-key", "module-prefix", "model-key-and-prefix"])
def test_plain_state_dicts_load(tmp_path, tiny, wrap):
    state = tiny.state_dict()
    torch.save(wrap(state), tmp_path / "ok.pt")
    loaded = labelless.load_state_dict_file(tmp_path / "ok.pt")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
