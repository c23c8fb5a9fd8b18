"""Progress: heartbeat lines when not on a terminal, a summary line when a bar goes."""

from __future__ import annotations

import logging

import pytest

from labelless import progress as module
from labelless.progress import progress


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "labelless.progress"]


def test_off_a_terminal_it_logs_heartbeats_with_rate_and_time_left(monkeypatch, caplog):
    monkeypatch.setenv("LABELLESS_PROGRESS", "0")
    monkeypatch.setattr(module, "HEARTBEAT_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="labelless.progress"):
        assert list(progress(range(4), desc="sweep", unit="round")) == [0, 1, 2, 3]
    lines = _messages(caplog)
    assert lines[0].startswith("sweep: 1/4 round (25%)") and "round/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("sweep: done, 4 round in")


def test_quick_work_off_a_terminal_says_nothing(monkeypatch, caplog):
    monkeypatch.setenv("LABELLESS_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="labelless.progress"):
        assert list(progress(iter("abc"), desc="quick")) == ["a", "b", "c"]
    assert not _messages(caplog)


@pytest.mark.parametrize("summary_seconds, expected", [(0.0, 1), (1e9, 0)])
def test_a_bar_leaves_one_summary_line_for_long_work_only(monkeypatch, caplog, summary_seconds, expected):
    monkeypatch.setenv("LABELLESS_PROGRESS", "1")
    monkeypatch.setattr(module, "SUMMARY_SECONDS", summary_seconds)
    with caplog.at_level(logging.INFO, logger="labelless.progress"):
        assert list(progress(range(3), desc="train", unit="step")) == [0, 1, 2]
    lines = _messages(caplog)
    assert len(lines) == expected and all(line.startswith("train: 3 step in") for line in lines)
