"""A config of 0.1.0 (its packaged demo config, git 668cac7, byte for byte) loads unchanged.

It differs from today's only in what moved: ``train.model.builder: pipeline.models:mlp``, which
now reads as ``pipeline.train.models:mlp`` with one deprecation line. (That such a config also
*runs* — trains, resuming 0.1.0's checkpoint — is test_fixtures.py's resume test.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from jobs.cli import DEMO_CONFIG
from pipeline import load_config
from pipeline.core import compat

OLD_DEMO = Path(__file__).resolve().parent / "configs" / "668cac7-demo.yaml"


def test_the_0_1_0_demo_config_loads_with_one_deprecation_line_per_renamed_key(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "_said", set())
    with caplog.at_level(logging.WARNING, logger=compat.DEPRECATION_LOGGER):
        old = load_config(OLD_DEMO).to_dict()
    lines = [r.getMessage() for r in caplog.records if r.name == compat.DEPRECATION_LOGGER]
    assert len(lines) == 1
    assert "'pipeline.models:mlp': use 'pipeline.train.models:mlp'" in lines[0]
    today = load_config(DEMO_CONFIG).to_dict()
    assert old["train"]["model"] == today["train"]["model"]
    # 0.1.0 wrote train.task (then defaulting to classification); today it is optional.
    assert old["train"] == {**today["train"], "task": "classification"}
    assert old["etl"] == today["etl"]
