"""Spark Connect: the whole pipeline against a real Connect server started by the tests.

One server (pyspark's ``sbin/start-connect-server.sh`` on 127.0.0.1, ``local[2]``) serves the
module. A Connect session in this process marks the process as Connect mode
(``SPARK_CONNECT_MODE_ENABLED``, which pyspark.sql.functions follow), so the fixture puts the
classic session's state back afterwards for the tests that follow. ``remote("local[2]")``
starts its own server inside pyspark, which cannot share a process with the suite's classic
SparkContext: it runs through the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from pipeline.launch import launcher
from pipeline.launch.launcher import DistributedError, run_distributed
from tests.configs import pipeline_config
from tests.connectserver import connect_server
from tests.integration.test_launcher import chatty_rank, failing_rank

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

_CONNECT_MODE = "SPARK_CONNECT_MODE_ENABLED"


@pytest.fixture(scope="module")
def connect_url(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from pyspark.sql import SparkSession

    saved = (SparkSession._instantiatedSession, SparkSession._activeSession)
    with connect_server(tmp_path_factory.mktemp("connect-server")) as url:
        try:
            yield url
        finally:
            session = SparkSession.getActiveSession()
            if session is not None and session is not spark:
                session.stop()
            os.environ.pop(_CONNECT_MODE, None)
            SparkSession._instantiatedSession, SparkSession._activeSession = saved


@pytest.fixture(scope="module")
def remote(connect_url: str, raw_data: Path) -> Any:
    """The Connect session (after ``raw_data``: classic calls fail once Connect mode is on)."""
    from pyspark.sql.connect.session import SparkSession

    os.environ[_CONNECT_MODE] = "1"  # as pyspark's own builder does
    return SparkSession.builder.remote(connect_url).getOrCreate()


@pytest.fixture(scope="module")
def raw_data(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preprocessing.make_data import make_data

    raw = tmp_path_factory.mktemp("raw") / "data"
    make_data(spark, 3000, str(raw), seed=4)
    return raw


def test_a_bad_remote_is_a_config_error(tmp_path: Path, capsys: Any) -> None:
    cfg = pipeline_config(tmp_path, tmp_path / "raw")
    assert main(["etl", "--config", str(cfg), "--remote", "http://host:15002"]) == 2
    err = capsys.readouterr().err
    assert "spark.remote" in err and "sc://HOST[:PORT]" in err


@pytest.fixture(scope="module")
def connect_run(
    remote: Any, connect_url: str, raw_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``spark-train run --remote URL``: ETL → train → evaluate over Connect; its directory."""
    work = tmp_path_factory.mktemp("connect-run")
    cfg = pipeline_config(work, raw_data)
    assert main(["run", "--config", str(cfg), "--remote", connect_url]) == 0
    return work


def test_run_etl_train_evaluate_then_score_over_connect(
    remote: Any, connect_url: str, connect_run: Path, raw_data: Path, capsys: Any
) -> None:
    summary = json.loads((connect_run / "run-summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert [s["status"] for s in summary["stages"]] == ["ran", "ran", "ran"]
    assert summary["stages"][0]["counts"]["rows_in"] == 3000
    assert summary["spark"]["remote"] == connect_url and summary["spark"]["master"] == "local[2]"
    assert summary["metrics"]["rows"] > 250  # the test split, evaluated

    scored = connect_run / "scored"
    args = ["--model", str(connect_run / "model"), "--input", str(raw_data)]
    cfg = str(connect_run / "c.yaml")
    assert (
        main(["score", "--config", cfg, "--remote", connect_url, *args, "--output", str(scored)])
        == 0
    )
    assert "model loads not counted (Spark Connect" in capsys.readouterr().out
    assert remote.read.parquet(str(scored)).where("prediction IS NOT NULL").count() > 2900


def test_model_averaging_over_connect(connect_url: str, connect_run: Path) -> None:
    # The rounds run as mapInArrow jobs and are summed on the client.
    averaged = ["--set", "train.mode=average", "--set", "train.averaging.rounds=2"]
    averaged += ["--set", f"train.output={connect_run / 'avg'}"]
    averaged += ["--set", f"train.checkpoint.dir={connect_run / 'avg-ckpt'}"]
    cfg = str(connect_run / "c.yaml")
    assert main(["train", "--config", cfg, "--remote", connect_url, *averaged]) == 0
    metrics = json.loads((connect_run / "avg" / "metrics.json").read_text())
    assert metrics["mode"] == "average" and len(metrics["rounds"]) == 2
    train_rows = json.loads((connect_run / "shards" / "manifest.json").read_text())["splits"]
    assert train_rows["train"]["rows"] - 2 <= metrics["rounds"][-1]["samples"]  # whole batches


def test_rank_logs_reach_the_client_and_a_failure_names_the_rank(
    remote: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="pipeline")
    assert run_distributed(chatty_rank, 2, num_workers=2, spark=remote) == [0, 1]
    messages = [r.getMessage() for r in caplog.records]
    assert "[rank 1] printed by rank 1" in messages
    assert "progress: epoch 0 step 2/2 loss 0.5 200.0 samples/s" in messages

    with pytest.raises(ValueError, match="boom at step 3") as info:
        run_distributed(failing_rank, num_workers=2, spark=remote)
    err = info.value
    assert isinstance(err, DistributedError) and err.rank == 1
    assert "rank 1 reached step 3" in err.tail


def test_unreachable_client_rendezvous_by_allgather_and_failure_in_the_error(
    remote: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ranks are told a log server address nothing listens on, as when the executors
    # cannot reach the client: they rendezvous through allGather, and the failure report
    # reaches the client inside Spark's error.
    monkeypatch.setattr(launcher, "log_server_address", lambda _: ("127.0.0.1", "127.0.0.2"))
    with pytest.raises(ValueError, match="boom at step 3") as info:
        run_distributed(failing_rank, num_workers=2, spark=remote)
    err = info.value
    assert isinstance(err, DistributedError) and err.rank == 1 and err.exc_type == "ValueError"
    assert "rank 1 reached step 3" in err.tail
    assert any('raise ValueError("boom at step 3")' in line for line in err.tail)


@pytest.mark.slow
def test_remote_local_trains_through_the_cli(
    connect_run: Path, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    # remote("local[2]"): pyspark starts a Connect server in the CLI's process; a DDP run on
    # the shard set the Connect run built (its ETL is tested above).
    cli = Path(sys.executable).parent / "spark-train"
    outputs = ["--set", f"train.output={tmp_path / 'model'}"]
    outputs += ["--set", f"train.checkpoint.dir={tmp_path / 'ckpt'}"]
    proc = subprocess.run(
        [
            str(cli),
            "train",
            "--config",
            str(connect_run / "c.yaml"),
            "--remote",
            "local[2]",
            *outputs,
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 1 epoch(s)" in proc.stdout and "on 2 workers" in proc.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()


def _depth(message: Any) -> int:
    """Nesting depth of a protobuf message (what the parser's recursion limit counts)."""
    inner = [
        _depth(v)
        for field, value in message.ListFields()
        if field.type == field.TYPE_MESSAGE
        for v in (value if field.is_repeated else [value])
    ]
    return 1 + max(inner, default=0)


def test_the_validation_plan_of_600_columns_is_flat(remote: Any) -> None:
    # The plan Spark Connect sends for the ETL's and scoring's validation of a wide table
    # must stay far below protobuf's depth limit (100): one level per column broke it.
    from pyspark.sql.connect import proto

    from preprocessing.config import EtlConfig
    from preprocessing.read import CORRUPT, SOURCE, RawInput, validate, validate_features

    numeric, categorical = [f"n{i}" for i in range(550)], [f"c{i}" for i in range(50)]
    schema = {"id": "long", "label": "int"} | dict.fromkeys(numeric, "double")
    schema |= dict.fromkeys(categorical, "string")
    cfg = EtlConfig.from_mapping(
        {
            "input": {"path": "unused"},
            "schema": schema,
            "key": "id",
            "label": "label",
            "numeric": numeric,
            "categorical": categorical,
            "output": "/unused",
        }
    )
    columns = ", ".join(f"`{c}` string" for c in [*schema, CORRUPT, SOURCE])
    df = remote.createDataFrame([], columns)
    for plan in (
        validate(RawInput(df, text=True), cfg),
        validate_features(RawInput(df, text=True), cfg),
    ):
        sent = plan._plan.to_proto(remote.client).SerializeToString()
        parsed = proto.Plan.FromString(sent)  # raised DecodeError (depth limit) before
        assert _depth(parsed) < 40, _depth(parsed)


@pytest.mark.slow
def test_a_wide_table_runs_and_scores_over_connect(
    connect_url: str, tmp_path: Path, capsys: Any
) -> None:
    # 500 numeric + 50 categorical columns: ETL, training, evaluation, then scoring.
    from tests.wide import wide_config, write_wide_csv

    raw = write_wide_csv(tmp_path / "raw", rows=200)
    cfg = str(wide_config(tmp_path, raw))
    assert main(["run", "--config", cfg, "--remote", connect_url]) == 0, capsys.readouterr().err
    out = tmp_path / "scored"
    args = ["--model", str(tmp_path / "model"), "--input", str(raw), "--output", str(out)]
    assert main(["score", "--config", cfg, "--remote", connect_url, *args]) == 0
    text = capsys.readouterr().out
    assert "scored 200 rows" in text and "value_invalid=" in text, text
