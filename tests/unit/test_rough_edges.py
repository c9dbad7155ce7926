"""Rough edges a new user hit, each fixed and held here (no Spark needed)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.clierrors import LOG_CHARS, log_effective_config
from pipeline.config import parse_config
from pipeline.core.configbase import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.preflight import check_training_inputs
from preprocessing.config import EtlConfig
from tests.shards import make_shardset

REPO = Path(__file__).resolve().parents[2]


def fixed_width_net(*, input_shape: Any, num_outputs: int) -> Any:
    """A user builder that ignores ``input_shape`` (expects 10 features)."""
    from torch import nn

    return nn.Linear(10, num_outputs)


def _train(tmp: Path, **over: Any) -> TrainConfig:
    dataset = make_shardset(tmp / "set", rows_per_shard={"train": [40, 24], "val": [16]}, dim=64)
    base = {
        "dataset": dataset,
        "num_workers": 2,
        "checkpoint": {"dir": str(tmp / "ckpt")},
        "output": str(tmp / "model"),
    }
    return TrainConfig.from_mapping({**base, **over})


@pytest.mark.parametrize(
    ("model", "key", "phrase"),
    [
        ({"builder": "no_such_module:net"}, "train.model.builder", "cannot import module"),
        ({"args": {"input_shape": [3, 5, 5]}}, "train.model.args.input_shape", "75 elements"),
        (  # imports and builds, but its first layer does not fit the 64 features
            {"builder": "tests.unit.test_rough_edges:fixed_width_net"},
            "train.model",
            "fails on a batch",
        ),
        ({"args": {"hidden": "wide"}}, "train.model.builder", "rejected its arguments"),
    ],
)
def test_a_model_that_cannot_train_is_refused_on_the_driver_in_seconds(
    tmp_path: Path, model: dict[str, Any], key: str, phrase: str
) -> None:
    cfg = _train(tmp_path, model=model)
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        check_training_inputs(cfg)
    assert time.monotonic() - started < 30
    assert e.value.key == key and phrase in str(e.value), str(e.value)


def test_a_model_that_fits_passes_the_preflight(tmp_path: Path) -> None:
    cfg = _train(
        tmp_path, model={"builder": "pipeline.train.models:cnn", "args": {"input_shape": [1, 8, 8]}}
    )
    check_training_inputs(cfg)


def test_an_unsupported_type_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as e:
        EtlConfig.from_mapping(
            {
                "input": {"path": "x"},
                "schema": {"id": "long", "m": "map<string,int>"},
                "key": "id",
                "label": "id",
                "output": "out",
            }
        )
    assert e.value.key == "etl.schema.m"
    assert "unsupported type 'map<string,int>'; supported: " in str(e.value)
    assert "double" in str(e.value) and "array<float" in str(e.value)


def test_the_effective_config_log_line_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A 1,604-line YAML (784 pixel columns) used to make one log line of many kilobytes."""
    pixels = {f"p{i}": "double" for i in range(784)}
    cfg = parse_config(
        {
            "etl": {
                "input": {"path": "x"},
                "schema": {"id": "long", "y": "int", **pixels},
                "key": "id",
                "label": "y",
                "numeric": list(pixels),
                "output": "out",
            }
        }
    )
    with caplog.at_level(logging.INFO):
        log_effective_config(logging.getLogger("test"), cfg)
    [line] = [r.getMessage() for r in caplog.records]
    assert len(line) < LOG_CHARS + 200
    assert "774 more" in line and "p0" in line  # summarized, not dropped silently


def test_the_setuptools_packaging_warning_is_gone(tmp_path: Path) -> None:
    """jobs/configs (data) was 'importable but absent from packages'; now it is discovered."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ beside the sources
    for name in ("pipeline", "preprocessing", "jobs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "jobs.configs" not in proc.stderr and "would be ignored" not in proc.stderr
    [wheel] = tmp_path.glob("*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "jobs/configs/demo.yaml" in names and "pipeline/train/modes/ddp.py" in names
