"""The run summary document and the ``--force`` / exit-status rules of ``spark-train run``."""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path

import pytest

from jobs.clierrors import UsageError
from jobs.runsummary import RunSummary, default_summary_path, one_line_error, versions
from jobs.workflow import FORCEABLE, exit_status, parse_force
from pipeline.config import ConfigError


def test_parse_force_accepts_stage_lists_and_all() -> None:
    assert parse_force("train") == {"train"}
    assert parse_force(" etl , train ") == {"etl", "train"}
    assert parse_force("all") == set(FORCEABLE) == {"etl", "train"}
    for bad in ("score2", "etl,nope", ",", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="choose from etl, train or all"):
            parse_force(bad)


def test_run_parser_force_forms(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["run", "--config", "c.yaml"]).force == frozenset()
    assert parse(["run", "--force", "--config", "c.yaml"]).force == {"etl", "train"}
    assert parse(["run", "--config", "c.yaml", "--force"]).force == {"etl", "train"}
    assert parse(["run", "--force", "train"]).force == {"train"}
    assert parse(["demo", "--force", "etl,train"]).force == {"etl", "train"}
    assert parse(["run", "--summary", "s.json"]).summary == "s.json"
    assert parse(["run", "--resume"]).resume and not parse(["run"]).resume
    assert parse(["etl", "--force"]).force is True  # the etl command's own flag is unchanged
    with pytest.raises(SystemExit) as info:
        parse(["run", "--force", "evaluate"])
    assert info.value.code == 2
    assert "unknown stage(s) ['evaluate']" in capsys.readouterr().err


def test_exit_status_mapping() -> None:
    assert exit_status(ConfigError("etl.output", "missing")) == 2
    assert exit_status(UsageError("--rows must be >= 1")) == 2
    assert exit_status(RuntimeError("executor lost")) == 1
    assert exit_status(KeyboardInterrupt()) == 130


def test_default_summary_path_is_beside_the_bundle() -> None:
    assert default_summary_path("out/model") == "out/run-summary.json"
    assert default_summary_path("out/model/") == "out/run-summary.json"
    assert default_summary_path("/data/runs/m") == "/data/runs/run-summary.json"
    assert default_summary_path("s3://bucket/runs/model") == "s3://bucket/runs/run-summary.json"
    assert default_summary_path("model") == "run-summary.json"


def test_one_line_error_keeps_type_and_first_line() -> None:
    assert one_line_error(ValueError("bad shard\n  detail")) == "ValueError: bad shard"
    assert one_line_error(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert one_line_error(RuntimeError("\n  rank 1 failed\n tail")) == "RuntimeError: rank 1 failed"


def test_stages_ran_skipped_failed_not_run(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "summary.json"
    s = RunSummary("run", ("etl", "train", "evaluate", "score"), path=str(path), forced=["train"])
    with s.stage("etl") as st:
        st.skip("up to date")
        st.counts = {"rows_in": 10}
    with s.stage("train") as st:
        st.metrics = {"train_loss": 0.5, "val_loss": math.nan}
    with pytest.raises(OSError, match="disk full"), s.stage("evaluate"):
        raise OSError("disk full\nsecond line")
    s.finish(1, OSError("disk full"))
    assert s.write() == str(path)

    doc = json.loads(path.read_text())  # strict JSON: NaN became null
    assert doc["status"] == "failed" and doc["exit_status"] == 1
    assert doc["error"] == "OSError: disk full" and doc["forced"] == ["train"]
    etl, train, evaluate, score = doc["stages"]
    assert (etl["status"], etl["reason"], etl["counts"]) == (
        "skipped",
        "up to date",
        {"rows_in": 10},
    )
    assert train["status"] == "ran" and train["metrics"] == {"train_loss": 0.5, "val_loss": None}
    assert evaluate["status"] == "failed" and evaluate["error"] == "OSError: disk full"
    assert score["status"] == "not_run" and score["started_at"] is None
    for st in (etl, train, evaluate):
        assert datetime.fromisoformat(st["started_at"]) <= datetime.fromisoformat(st["ended_at"])
        assert st["seconds"] >= 0
    assert datetime.fromisoformat(doc["started_at"]) <= datetime.fromisoformat(doc["ended_at"])
    assert doc["versions"]["torch"] and doc["versions"]["pyspark"] and doc["versions"]["python"]
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temp file left


def test_success_and_validation(tmp_path: Path) -> None:
    s = RunSummary("run", ("etl",), path=None)
    with pytest.raises(ValueError, match="no path"):
        s.write()
    s.path = str(tmp_path / "s.json")
    s.finish(0)
    doc = json.loads(Path(s.write()).read_text())
    assert (doc["status"], doc["exit_status"], doc["error"]) == ("succeeded", 0, None)
    with pytest.raises(ValueError, match="unique"):
        RunSummary("run", ("etl", "etl"), path=None)
    assert set(versions()) >= {"python", "spark-train", "pyspark", "torch", "pyarrow"}
