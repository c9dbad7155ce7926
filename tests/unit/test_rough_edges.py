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
from pipeline.train.preflight import check_training_inputs, resolve_task
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


def batch_norm_net(*, input_shape: Any, num_outputs: int) -> Any:
    """A user builder with a BatchNorm layer (64 features)."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, num_outputs))


def test_a_one_row_last_batch_for_batch_norm_is_refused_naming_drop_last(tmp_path: Path) -> None:
    # 64 train rows, 2 ranks: 32 rows each; batches of 31 leave a last batch of 1 row.
    model = {"builder": "tests.unit.test_rough_edges:batch_norm_net"}
    with pytest.raises(ConfigError) as e:
        check_training_inputs(_train(tmp_path, model=model, batch_size=31))
    assert e.value.key == "train.drop_last", str(e.value)
    assert "BatchNorm" in str(e.value) and "32 rows per rank" in str(e.value)
    check_training_inputs(_train(tmp_path / "a", model=model, batch_size=31, drop_last=True))
    check_training_inputs(_train(tmp_path / "b", model=model, batch_size=8))
    check_training_inputs(_train(tmp_path / "c", batch_size=31))  # the MLP has no BatchNorm
    with pytest.raises(ConfigError, match="fewer than its batch of 40") as e:
        check_training_inputs(_train(tmp_path / "d", batch_size=40, drop_last=True))
    assert e.value.key == "train.drop_last"


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


def test_train_task_defaults_to_the_shard_sets_and_a_mismatch_stays_an_error(
    tmp_path: Path,
) -> None:
    """A regression shard set used to need ``train.task: regression`` spelled out."""
    data = make_shardset(
        tmp_path / "set", rows_per_shard={"train": [40], "val": [8]}, task="regression"
    )
    base = {"dataset": data, "checkpoint": {"dir": str(tmp_path / "c")}, "num_workers": 2}
    cfg = TrainConfig.from_mapping({**base, "output": str(tmp_path / "m")})
    assert cfg.task is None
    shards = check_training_inputs(cfg)  # the model preflight builds a 1-output regressor
    assert resolve_task(cfg, shards).task == "regression"
    explicit = TrainConfig.from_mapping({**base, "task": "classification", "output": "m2"})
    with pytest.raises(ConfigError, match="built for 'regression'") as e:
        check_training_inputs(explicit)
    assert e.value.key == "train.task"


USER_MODULE = """
from torch import nn


def net(*, input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_outputs))
"""


def test_a_model_module_in_the_working_directory_works_in_evaluate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``builder: "mymodels:net"`` worked in train and score (executors) but not evaluate."""
    import torch

    from pipeline.data.shardset import ShardSet
    from pipeline.train import bundle, engine

    work = tmp_path / "work"
    work.mkdir()
    (work / "mymodels.py").write_text(USER_MODULE)
    data = make_shardset(tmp_path / "set", rows_per_shard={"train": [20], "test": [12]}, dim=6)
    cfg = TrainConfig.from_mapping(
        {"dataset": data, "model": {"builder": "mymodels:net"}, "output": str(tmp_path / "m")}
    )
    monkeypatch.syspath_prepend(str(work))  # to write the bundle here
    shards = ShardSet.open(data)
    torch.manual_seed(0)
    shape, outputs = engine.model_shape(cfg, shards)
    spec = bundle.model_spec(cfg, shards, input_shape=shape, num_outputs=outputs)
    model = engine.new_model(cfg, shards)
    uri = bundle.write_bundle(cfg.output, model=model, spec=spec, metrics={}, config={})
    script = Path(sys.executable).parent / "spark-train"  # a console script, not python -m
    proc = subprocess.run(
        [str(script), "evaluate", "--model", uri],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert '"rows": 12' in proc.stdout


def test_run_checks_the_train_section_before_the_etl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A builder that does not import used to surface after the whole ETL had run."""
    import yaml

    from jobs.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part.csv").write_text("id,x,y\n1,0.5,0\n2,1.5,1\n")
    config = {
        "spark": {"master": "local[1]"},
        "etl": {
            "input": {"path": str(raw), "format": "csv"},
            "schema": {"id": "long", "x": "double", "y": "int"},
            "key": "id",
            "label": "y",
            "numeric": ["x"],
            "output": str(tmp_path / "shards"),
        },
        "train": {
            "dataset": str(tmp_path / "shards"),
            "model": {"builder": "no_such_module:net"},
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "output": str(tmp_path / "model"),
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    assert main(["run", "--config", str(path)]) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "train.model.builder" in err and "no_such_module" in err, err[-800:]
    assert not (tmp_path / "shards").exists()  # the ETL did not run
    config["train"]["model"] = {}
    config["train"]["task"] = "regression"  # y is an int label: the ETL builds classification
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 2
    assert "train.task" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


@pytest.mark.slow
def test_executors_running_another_python_get_a_one_line_error(tmp_path: Path) -> None:
    """A session whose executors run ``python3`` (no spark-train there) used to fail in every
    rank of every attempt with ``No module named 'pipeline'``."""
    import os

    import yaml

    other = shutil.which("python3", path="/usr/bin:/bin")
    if other is None or Path(other).resolve() == Path(sys.executable).resolve():
        pytest.skip("needs a second Python interpreter without spark-train")
    data = make_shardset(tmp_path / "set", rows_per_shard={"train": [20], "val": [4]}, dim=4)
    config = {
        "spark": {"master": "local[1]"},
        "train": {
            "dataset": data,
            "num_workers": 1,
            "max_attempts": 3,
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "output": str(tmp_path / "model"),
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYSPARK_PYTHON": other}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "spark-train"), "train", "--config", "c.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stderr.splitlines() if "spark-train train: error" in ln]
    assert "spark.pyspark.python" in line and f"the executors run {other}" in line, line
    assert "which cannot import" in line and "torch" in line and "set PYSPARK_PYTHON" in line, line
    assert "attempt" not in proc.stderr  # refused before any launch


def test_score_checks_that_the_bundles_model_builds_before_spark_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from jobs.cli import main
    from tests.reliability.helpers import bundle_for

    dataset = make_shardset(tmp_path / "set", rows_per_shard={"train": [8], "val": [4]}, dim=4)
    bundle = bundle_for(dataset, tmp_path / "model")
    spec = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps({**spec, "builder": "gone_module_x:net"}))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.csv").write_text("id,f0\n1,0.5\n")
    started = time.monotonic()
    argv = ["score", "--model", str(bundle), "--input", str(tmp_path / "in")]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'--model'" in err, err
    assert "'gone_module_x:net'" in err and "cannot import module 'gone_module_x'" in err, err
    assert time.monotonic() - started < 20  # on the driver, before any Spark job
