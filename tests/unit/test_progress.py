"""The driver's progress display: a tqdm bar on a terminal, rate-limited log lines otherwise."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from pipeline.runtime.progress import ProgressDisplay


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _msg(epoch: int, step: int) -> dict[str, float | int]:
    return {"epoch": epoch, "step": step, "steps": 10, "samples_per_s": 123.0, "loss": 0.5}


def test_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    display = ProgressDisplay()
    for step in (3, 10):
        display.update(_msg(0, step))
    display.update(_msg(1, 4))  # a new epoch starts a new bar
    display.close()
    out = term.getvalue()
    assert "epoch 0" in out and "epoch 1" in out
    assert "loss=0.5" in out and "10/10" in out


def test_log_lines_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    display = ProgressDisplay(log_every_s=3600)
    with caplog.at_level(logging.INFO, logger="pipeline.runtime.progress"):
        for step in (1, 2, 10):
            display.update(_msg(0, step))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress")]
    # the first report and the epoch's last one; the rate limit swallows the one between
    assert len(lines) == 2 and "10/10" in lines[-1]
