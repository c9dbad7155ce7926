"""The whole pipeline through the CLI and through spark-submit: etl → train → evaluate."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from tests.configs import pipeline_config
from tests.conftest import spark_submit
from tests.shards import make_shardset

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]


def _config(tmp_path: Path, raw: Path) -> Path:
    return pipeline_config(
        tmp_path,
        raw,
        model={"builder": "pipeline.train.models:mlp", "args": {"hidden": [32]}},
        epochs=3,
        optimizer={"name": "adamw", "lr": 0.01},
        checkpoint={"dir": str(tmp_path / "ckpt"), "every_steps": 10, "keep": 2},
    )


@pytest.fixture(scope="module")
def raw_data(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preprocessing.make_data import make_data

    raw = tmp_path_factory.mktemp("raw") / "data"
    make_data(spark, 8000, str(raw), seed=3)
    return raw


@pytest.fixture(scope="module")
def trained(
    spark: Any, raw_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """One ``spark-train run`` (ETL → 3 epochs → test metrics) for the module: its config and
    what it printed. The tests only read its shard set and bundle, or rerun it unchanged."""
    cfg = _config(tmp_path_factory.mktemp("run"), raw_data)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", "--config", str(cfg)]) == 0
    return cfg, printed.getvalue()


def test_run_trains_evaluates_and_skips_up_to_date_stages(
    trained: tuple[Path, str], capsys: Any
) -> None:
    cfg, out = trained
    work = cfg.parent
    assert "built" in out and "trained 3 epoch(s)" in out and "test metrics" in out
    metrics = json.loads((work / "model" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3

    assert main(["run", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "up to date (nothing to do)" in out and "not retrained" in out

    # a changed train setting retrains, an operational one does not
    assert main(["run", "--config", str(cfg), "--set", "train.max_attempts=2"]) == 0
    assert "not retrained" in capsys.readouterr().out

    assert main(["evaluate", "--config", str(cfg), "--split", "val"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["split"] == "val" and ev["rows"] > 500
    assert ev["accuracy"] > 0.6, ev  # make-data's label is learnable; chance is ~0.5

    assert main(["inspect", str(work / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "bundle"
    assert main(["inspect", str(work / "ckpt"), "--json"]) == 0
    ck = json.loads(capsys.readouterr().out)
    assert ck["kind"] == "checkpoints" and ck["latest_valid"] == max(ck["steps"])


def test_evaluate_refuses_a_mismatched_shard_set(
    trained: tuple[Path, str], tmp_path: Path, capsys: Any
) -> None:
    """A shard set whose feature vector is not the model's (as one built with another etl
    config, e.g. without one-hot columns, has) is refused, naming the column and both shapes."""
    work = trained[0].parent
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    width = len(manifest["feature_names"])
    other = make_shardset(
        tmp_path / "other", rows_per_shard={"train": [16], "test": [16]}, dim=width - 3
    )
    rc = main(["evaluate", "--model", str(work / "model"), "--dataset", other])
    assert rc == 1
    err = capsys.readouterr().err
    assert "trained on" in err and other in err, err
    assert f"column 'features' is float32 [{width - 3}]" in err, err
    assert f"the model was trained on float32 [{width}]" in err, err


def test_spark_submit_reports_a_config_error_like_the_cli(raw_data: Path, tmp_path: Path) -> None:
    # The whole pipeline under spark-submit runs in test_standalone.py (standalone master);
    # here: the same exit code and message as `spark-train` for a bad key.
    cfg = _config(tmp_path, raw_data)
    bad = spark_submit("local[1]", "etl", "--config", str(cfg), "--set", "etl.nope=1", timeout=200)
    # spark-submit forwards the Python driver's stderr on its stdout
    assert bad.returncode == 2 and "etl.nope" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_a_wide_table_runs_and_scores(spark: Any, tmp_path: Path, capsys: Any) -> None:
    # 500 numeric + 50 categorical columns on the classic session (Spark Connect:
    # test_connect.py): the validation once overflowed the JVM's stack (an AND per column).
    from tests.wide import wide_config, write_wide_csv

    raw = write_wide_csv(tmp_path / "raw", rows=200)
    cfg = str(wide_config(tmp_path, raw))
    assert main(["run", "--config", cfg]) == 0, capsys.readouterr().err
    out = tmp_path / "scored"
    args = ["--model", str(tmp_path / "model"), "--input", str(raw), "--output", str(out)]
    assert main(["score", "--config", cfg, *args]) == 0
    text = capsys.readouterr().out
    assert "scored 200 rows" in text and "value_invalid=" in text, text
