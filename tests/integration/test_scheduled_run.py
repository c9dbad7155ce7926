"""``spark-train run`` as a scheduler runs it: per-stage skipping, ``--force``, the run summary
(also when a stage fails) and the exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import main
from pipeline.data.shardset import ShardSet
from tests.configs import pipeline_config

pytestmark = [pytest.mark.spark, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def raw_data(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preprocessing.make_data import make_data

    raw = tmp_path_factory.mktemp("raw") / "data"
    make_data(spark, 3000, str(raw), seed=5)
    return raw


@pytest.fixture(scope="module")
def shard_set(spark: Any, raw_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ETL of ``raw_data`` for the tests about later stages (they find it up to date).

    Building it is test_stages_skip_when_up_to_date_and_force_reruns_them's business.
    """
    cfg = pipeline_config(tmp_path_factory.mktemp("etl"), raw_data)
    assert main(["etl", "--config", str(cfg)]) == 0
    return cfg.parent / "shards"


def _on(shards: Path, cfg: Path) -> Path:
    """``cfg`` with its ETL output and its training's dataset moved to ``shards``."""
    data = yaml.safe_load(cfg.read_text())
    data["etl"]["output"] = data["train"]["dataset"] = str(shards)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def _stages(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc["stages"]}


@pytest.mark.slow
def test_stages_skip_when_up_to_date_and_force_reruns_them(
    spark: Any, raw_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = pipeline_config(tmp_path, raw_data)
    assert main(["run", "--config", str(cfg)]) == 0
    default = tmp_path / "run-summary.json"  # beside the bundle
    assert f"run summary: {default}" in capsys.readouterr().out
    doc = json.loads(default.read_text())
    assert (doc["status"], doc["exit_status"], doc["error"]) == ("succeeded", 0, None)
    stages = _stages(doc)
    assert [s["status"] for s in doc["stages"]] == ["ran", "ran", "ran"]
    etl = stages["etl"]["counts"]
    assert etl["rows_in"] == 3000 == etl["rows_ok"] + etl["rows_quarantined"]
    assert etl["rows_quarantined"] == sum(etl["quarantined_by_reason"].values()) > 0
    assert etl["shards"] == 6 and sum(etl["rows_by_split"].values()) == etl["rows_ok"]
    train = stages["train"]
    assert train["counts"]["world_size"] == 2 and train["counts"]["epochs"] == 1
    assert train["counts"]["steps"] > 0 and "val_loss" in train["metrics"]
    assert doc["metrics"]["split"] == "test" and 0.0 <= doc["metrics"]["accuracy"] <= 1.0
    assert doc["metrics"] == stages["evaluate"]["metrics"]
    assert doc["outputs"] == {
        "shard_set": str(tmp_path / "shards"),
        "bundle": str(tmp_path / "model"),
    }
    assert doc["spark"]["master"] == "local[2]" and doc["spark"]["version"].startswith("4.")
    assert doc["versions"]["pyspark"] == doc["spark"]["version"]
    generation = etl["generation"]
    weights = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns

    # A rerun does nothing but evaluate, and says so.
    custom = tmp_path / "runs" / "second.json"
    assert main(["run", "--config", str(cfg), "--summary", str(custom)]) == 0
    out = capsys.readouterr().out
    assert "up to date (nothing to do)" in out and "not retrained" in out
    stages = _stages(json.loads(custom.read_text()))
    assert [s["status"] for s in stages.values()] == ["skipped", "skipped", "ran"]
    assert "same input files and etl config" in stages["etl"]["reason"]
    assert "same shard-set generation and train config" in stages["train"]["reason"]
    assert stages["etl"]["counts"]["generation"] == generation
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == weights

    # --force train retrains on the same shard set.
    assert main(["run", "--config", str(cfg), "--force", "train", "--summary", str(custom)]) == 0
    doc = json.loads(custom.read_text())
    assert doc["forced"] == ["train"]
    assert [s["status"] for s in doc["stages"]] == ["skipped", "ran", "ran"]
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns != weights

    # --force etl builds a new generation, which makes the bundle stale: both run.
    assert main(["run", "--config", str(cfg), "--force", "etl", "--summary", str(custom)]) == 0
    stages = _stages(json.loads(custom.read_text()))
    assert [s["status"] for s in stages.values()] == ["ran", "ran", "ran"]
    assert stages["etl"]["counts"]["generation"] != generation


def test_a_failing_stage_still_writes_the_summary(
    raw_data: Path, shard_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _on(shard_set, pipeline_config(tmp_path, raw_data, max_attempts=1))
    # Corrupt a shard without changing its size: the ETL still finds the shard set up to
    # date (it compares sizes), and training's sha256 check must catch it. The shard set is
    # the module's: the byte is flipped back afterwards.
    shards = ShardSet.open(str(shard_set))
    victim = Path(shards.shard_path(shards.split("train").shards[0]))
    whole = victim.read_bytes()
    data = bytearray(whole)
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()

    summary = tmp_path / "failed.json"
    try:
        assert main(["run", "--config", str(cfg), "--summary", str(summary)]) == 1
    finally:
        victim.write_bytes(whole)
    err = capsys.readouterr().err
    doc = json.loads(summary.read_text())
    assert (doc["status"], doc["exit_status"]) == ("failed", 1)
    stages = _stages(doc)
    assert [s["status"] for s in doc["stages"]] == ["skipped", "failed", "not_run"]
    assert "corrupt" in stages["train"]["error"] and "\n" not in stages["train"]["error"]
    assert doc["error"] == stages["train"]["error"]
    assert doc["error"].split(": ", 1)[1] in err  # the same line the CLI printed
    assert stages["train"]["seconds"] >= 0 and stages["evaluate"]["started_at"] is None


def test_a_config_error_inside_run_exits_2_with_a_summary(
    raw_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = pipeline_config(tmp_path, raw_data)
    summary = tmp_path / "bad.json"
    argv = ["run", "--config", str(cfg), "--set", "train.dataset=elsewhere"]
    assert main([*argv, "--summary", str(summary)]) == 2
    assert "train.dataset" in capsys.readouterr().err
    doc = json.loads(summary.read_text())
    assert (doc["status"], doc["exit_status"]) == ("failed", 2)
    assert "train.dataset" in doc["error"] and doc["overrides"] == ["train.dataset=elsewhere"]
    assert {s["status"] for s in doc["stages"]} == {"not_run"}

    # A summary that cannot be written does not hide the run's own error.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*argv, "--summary", str(blocker / "s.json")]) == 2
    assert "train.dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_lets_a_rerun_continue_a_failed_training(
    spark: Any,
    raw_data: Path,
    shard_set: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A scheduler's retry: the failed run left checkpoints, ``run --resume`` continues them."""
    from pipeline.runtime.faults import FAULT_ENV

    cfg = _on(shard_set, pipeline_config(tmp_path, raw_data, max_attempts=1, epochs=2))
    summary = tmp_path / "s.json"
    argv = ["run", "--config", str(cfg), "--summary", str(summary)]
    # Python workers get the SparkContext's environment (a new worker daemon for a new one).
    env = spark.sparkContext.environment
    env[FAULT_ENV] = "rank=1,step=12,kind=raise"
    try:
        assert main(argv) == 1
    finally:
        del env[FAULT_ENV]
    stages = _stages(json.loads(summary.read_text()))
    assert stages["train"]["status"] == "failed" and "injected failure" in stages["train"]["error"]
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert checkpoints and checkpoints[-1] == "step-000000000010", checkpoints

    # Without --resume the unfinished run's checkpoints are refused, not silently reused.
    assert main(argv) == 1
    assert "train.resume=true" in json.loads(summary.read_text())["error"]
    capsys.readouterr()

    assert main([*argv, "--resume"]) == 0
    doc = json.loads(summary.read_text())
    train = _stages(doc)["train"]
    assert train["status"] == "ran" and train["counts"]["resumed_from"] == 10
    assert train["counts"]["epochs"] == 2 and doc["status"] == "succeeded"
