"""Airflow DAG: the pipeline as three spark-submit jobs on YARN, ETL → train → score, daily.

Each task is a ``SparkSubmitOperator`` running one of the project's spark-submit jobs, sized
for its stage (the files in ``jobs/deploy/``):

- ``etl``: ``jobs/etl.py`` on CPU executors under dynamic allocation
  (``spark-defaults.etl.conf``); a no-op when the input files and config are unchanged.
- ``train``: ``jobs/run.py`` on a fixed set of GPU executors (barrier stages need static
  allocation: ``spark-defaults.train-yarn-gpu.conf``). ``run`` is the train job plus what a
  schedule needs: it skips training when the bundle already matches this shard-set
  generation and config (the ETL it starts with is then a listing of the input), evaluates
  the bundle, and writes a run summary per DAG run (``--summary``). Checkpoints go to a
  directory per DAG run and ``--resume`` makes an Airflow retry continue from the last one.
- ``score``: ``jobs/score.py`` on CPU executors; replaces the day's scored table atomically.

Exit codes follow the CLI (0 ok, 1 runtime failure, 2 bad usage or config): a task retries on
1; a 2 will fail again, so ``retries`` is kept small. Needs
``apache-airflow-providers-apache-spark`` and a Spark connection (``SPARK_CONN_ID``) whose host
is ``yarn``; paths below are examples to adapt.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

# Where the project is checked out on the Airflow workers (spark-submit runs there).
REPO = Path(os.environ.get("SPARK_TRAIN_HOME", str(Path(__file__).resolve().parents[2])))
DEPLOY = REPO / "jobs" / "deploy"
CONFIG = os.environ.get("SPARK_TRAIN_CONFIG", str(DEPLOY / "cluster.yaml"))
# Built by jobs/deploy/pack_env.sh and uploaded where every node can read it.
ENV_ARCHIVE = os.environ.get(
    "SPARK_TRAIN_ENV_ARCHIVE", "hdfs:///apps/spark-train/spark-train-env.tar.gz"
)
RUNS = os.environ.get("SPARK_TRAIN_RUNS", "s3://example-bucket/spark-train/runs")
SCORE_INPUT = os.environ.get("SPARK_TRAIN_SCORE_INPUT", "s3://example-bucket/raw/to-score/")
SPARK_CONN_ID = os.environ.get("SPARK_TRAIN_CONN_ID", "spark_yarn")
NUM_WORKERS = 4  # GPU executors = training ranks

# Cluster deploy mode: the driver runs in YARN, so the config travels with --files and is
# named by its base name; the environment archive is unpacked as ./environment.
CONFIG_NAME = Path(CONFIG).name
COMMON_CONF = {
    "spark.submit.deployMode": "cluster",
    "spark.pyspark.python": "./environment/bin/python",
}
DAY = "{{ ds_nodash }}"


def _job(name: str) -> str:
    return str(REPO / "jobs" / f"{name}.py")


with DAG(
    dag_id="spark_train",
    description="spark-train: ETL → train (GPU) → score",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one run at a time: stages share the shard set and the bundle
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["spark-train"],
) as dag:
    etl = SparkSubmitOperator(
        task_id="etl",
        conn_id=SPARK_CONN_ID,
        name="spark-train-etl",
        application=_job("etl"),
        properties_file=str(DEPLOY / "spark-defaults.etl.conf"),
        archives=f"{ENV_ARCHIVE}#environment",
        files=CONFIG,
        conf=COMMON_CONF,
        application_args=["--config", CONFIG_NAME],
    )
    train = SparkSubmitOperator(
        task_id="train",
        conn_id=SPARK_CONN_ID,
        name="spark-train-train",
        application=_job("run"),
        properties_file=str(DEPLOY / "spark-defaults.train-yarn-gpu.conf"),
        archives=f"{ENV_ARCHIVE}#environment",
        files=f"{CONFIG},{DEPLOY / 'gpu_discovery.sh'}",
        conf={**COMMON_CONF, "spark.executor.instances": str(NUM_WORKERS)},
        application_args=[
            "--config",
            CONFIG_NAME,
            "--set",
            f"train.num_workers={NUM_WORKERS}",
            "--set",
            f"train.checkpoint.dir={RUNS}/{DAY}/ckpt",
            "--resume",
            "--summary",
            f"{RUNS}/{DAY}/run-summary.json",
        ],
    )
    score = SparkSubmitOperator(
        task_id="score",
        conn_id=SPARK_CONN_ID,
        name="spark-train-score",
        application=_job("score"),
        properties_file=str(DEPLOY / "spark-defaults.etl.conf"),
        archives=f"{ENV_ARCHIVE}#environment",
        files=CONFIG,
        conf=COMMON_CONF,
        application_args=[
            "--config",
            CONFIG_NAME,
            "--input",
            SCORE_INPUT,
            "--output",
            f"{RUNS}/{DAY}/scored",
        ],
    )
    etl >> train >> score
