"""What ``spark-train``'s commands and ``spark-train run`` share: the session and the stages.

:func:`spark_session` builds a command's SparkSession; :func:`run_etl_stage` and
:func:`run_train_stage` run one stage and print what it did, the same for ``spark-train etl``
/ ``train`` as for a stage of ``spark-train run`` (:mod:`jobs.workflow`).

pyspark, torch and the ETL are imported inside the functions that use them, so that
``spark-train --help``, a usage error and the commands that need neither stay quick.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from pipeline.config import Config, ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipeline.launch.fit import TrainResult
    from pipeline.train.config import TrainConfig
    from preprocessing.config import EtlConfig
    from preprocessing.etl import EtlResult

__all__ = [
    "run_etl_stage",
    "run_train_stage",
    "spark_session",
    "train_summary",
    "with_input_errors",
]

T = TypeVar("T")


def spark_session(cfg: Config, *, under_submit: bool) -> SparkSession:
    """The SparkSession for a command; under spark-submit the master comes from spark-submit.

    With ``spark.remote`` (``--remote``) a Spark Connect session: there is no local
    SparkContext, and the server's log level is the server's own.
    """
    from pyspark.sql import SparkSession  # lazy: see the module docstring

    remote = cfg.spark.remote
    if remote is not None and under_submit:
        raise ConfigError(
            "spark.remote",
            "is not used under spark-submit, which starts a classic driver: run spark-train "
            "itself with --remote, or drop spark.remote",
        )
    if remote is not None and remote.startswith("sc://"):
        return _connect_session(remote, cfg)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if remote is not None:  # local[N]: pyspark starts a local Connect server, with this Python
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.remote(remote)
    elif not under_submit:
        builder = builder.master(cfg.spark.master)
        if cfg.spark.master.startswith("local"):
            # Local Python workers must run this interpreter (the venv), not `python3` on PATH.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    conf = dict(cfg.spark.conf)
    if remote is None:
        conf["spark.ui.showConsoleProgress"] = "false"
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    if remote is None:
        spark.sparkContext.setLogLevel(os.environ.get("SPARK_TRAIN_SPARK_LOG_LEVEL", "WARN"))
    return spark


def _connect_session(url: str, cfg: Config) -> SparkSession:
    """A session on the Connect server at ``url``, built with the Connect builder itself.

    (pyspark's generic builder refuses a remote session in a process that also holds a
    classic one; the environment flag is what its builder sets, for ``pyspark.sql.functions``.)
    """
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
    builder = ConnectSession.builder.remote(url)
    for k, v in cfg.spark.conf.items():
        builder = builder.config(k, v)
    return cast("SparkSession", builder.getOrCreate())


def with_input_errors(fn: Callable[[], T]) -> T:
    """``fn()``, a missing input (path or table) a config error naming ``etl.input.path``.

    See :func:`preprocessing.read.missing_input_as_config_error`; the whole stage is covered,
    since under Spark Connect a missing path may surface only when the plan runs.
    """
    from preprocessing.read import missing_input_as_config_error  # lazy: imports pyspark

    with missing_input_as_config_error("etl.input.path"):
        return fn()


def run_etl_stage(spark: SparkSession, cfg: EtlConfig, *, force: bool) -> EtlResult:
    """Run the ETL (a no-op when up to date unless ``force``) and print its summary."""
    from preprocessing.etl import run_etl  # lazy: see the module docstring

    result = with_input_errors(lambda: run_etl(spark, cfg, force=force))
    print(result.summary())
    return result


def run_train_stage(spark: SparkSession, cfg: TrainConfig) -> TrainResult:
    """Train on the shard set and print :func:`train_summary`."""
    from pipeline.launch.fit import fit  # lazy: see the module docstring

    result = fit(cfg, spark)
    print(train_summary(result))
    return result


def train_summary(result: TrainResult) -> str:
    """What a finished training run prints: epochs, steps, workers, final metrics, bundle."""
    final = {k: v for k, v in result.final.items() if v is not None}
    shown = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()
    )
    resumed = (
        f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
    )
    sizes = [str(r["from"]) for r in result.resizes] + [str(result.world_size)]
    workers = "→".join(sizes) if result.resizes else str(result.world_size)
    return (
        f"trained {len(result.epochs)} epoch(s), {result.steps} steps on {workers} "
        f"workers (attempt {result.attempt + 1}{resumed})\n  final: {shown}\n  bundle: {result.bundle}"
    )
