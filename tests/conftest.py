"""Shared fixtures: one session-scoped local[2] SparkSession for every Spark test.

Tests that need separate executor JVMs (local-cluster, standalone) run their Spark
application in a subprocess, because one Python process can hold only one SparkContext.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Spark workers must run this interpreter (the venv), not whatever `python3` is on PATH.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
# The tests' JVMs run short jobs on small data, where the C1 JIT alone (no C2) starts and
# finishes sooner than tiered compilation: test_cli_etl.py took 44-48 s instead of 60 s on the
# 2-core box. spark-submit puts SPARK_SUBMIT_OPTS on every driver JVM it launches: this
# session's, and those of the CLI, spark-submit, Connect server and notebook processes the
# tests start (they inherit this environment). A value the caller set is kept.
os.environ.setdefault("SPARK_SUBMIT_OPTS", "-XX:TieredStopAtLevel=1")
# Python workers import functions defined in test modules (pickled by reference) and the
# project's packages, wherever pytest was started from.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("spark-train-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    """Environment for child processes that run a Spark application or torchrun."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    return env


def spark_submit(
    master: str, job: str, *args: str, conf: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``spark-submit --master MASTER jobs/JOB.py ARGS`` with this venv; output captured."""
    cmd, env = spark_submit_command(master, job, *args, conf=conf)
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def spark_submit_command(
    master: str, job: str, *args: str, conf: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of :func:`spark_submit` (to start it yourself)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
    )
    settings = {
        "spark.ui.enabled": "false",
        "spark.executorEnv.PYTHONPATH": str(REPO),
        **(conf or {}),
    }
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", master]
    for k, v in settings.items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += [str(REPO / "jobs" / f"{job}.py"), *args]
    return cmd, env
