"""spark-train's training side, and its public Python API.

Import what you need from here; the subpackages are the implementation::

    from pipeline import load_config, fit, evaluate, score

    cfg = load_config("c.yaml")
    result = fit(cfg.train, spark)              # barrier-mode DDP / FSDP, or model averaging
    metrics = evaluate(result.bundle, split="test")
    scored = score(spark, spark.read.parquet("new/"), result.bundle)

=====================  ==========================================================
name                   what it is
=====================  ==========================================================
``load_config``        read a YAML config (sections ``spark``, ``etl``, ``train``)
``Config``             the whole config; ``SparkConfig``, ``EtlConfig``,
                       ``TrainConfig`` are its sections; ``ConfigError`` names a key
``fit``                train ``TrainConfig`` on Spark; returns a ``TrainResult``
``run_distributed``    run any function or torchrun script as N ranks of one Spark
                       barrier job (torchrun environment, logs, relaunch)
``DistributedError``   what ``fit`` / ``run_distributed`` raise when ranks fail
``TorchDistributor``   drop-in for PySpark's ``TorchDistributor`` on ``run_distributed``
``TorchEstimator``     Spark ML estimator: ``fit(df)`` runs ETL + training on a DataFrame
``TorchModel``         its model: ``transform(df)`` scores; saves / loads as a bundle
``evaluate``           a bundle's loss and accuracy / RMSE on a split (no Spark)
``score``              score a DataFrame with a bundle (lazy, ``mapInArrow``)
``ShardSet``           open a committed shard set (manifest, splits, columns)
``ShardReader``        the Arrow → torch reader training uses (equal steps per rank)
``load_bundle``        a trained model bundle, loaded without pickle
``register_mode``      add a training mode, e.g. a ``BarrierMode`` subclass
                       (see :mod:`pipeline.train.registry`)
=====================  ==========================================================

``__version__`` is the installed distribution's version (:mod:`pipeline.core.version`). Module
paths of earlier releases (``pipeline.models``, ``pipeline.bundle``…) still import, with one
deprecation line (:data:`pipeline.core.compat.MOVED_MODULES`).

Names resolve on first use (PEP 562), so ``import pipeline.data`` or ``python -m
pipeline.worker`` on a machine without pyspark never imports Spark or scoring.

Layout (the data flow, bottom up; ``make lint`` enforces the layers with import-linter):
``core`` (config base, storage, output rules) → ``runtime`` (what a rank process has around
it: environment, driver channel, heartbeats, progress, faults) → ``data`` (the shard-set
format, format registry, reader; Spark-free) → ``train`` (one engine, modes, checkpoints,
models, bundle; Spark-free) → ``launch`` (Spark barrier launcher, averaging rounds, ``fit``)
and ``serve`` (evaluate, score, inspect) → ``estimator`` (the notebook API over both).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core.compat import install_module_aliases
from pipeline.core.version import __version__

if TYPE_CHECKING:
    from pipeline.config import Config, SparkConfig, load_config
    from pipeline.core.configbase import ConfigError
    from pipeline.data.reader import ShardReader
    from pipeline.data.shardset import ShardSet
    from pipeline.estimator import TorchEstimator, TorchModel
    from pipeline.launch.distributor import TorchDistributor
    from pipeline.launch.fit import TrainResult, fit
    from pipeline.launch.launcher import DistributedError, run_distributed
    from pipeline.serve.evaluate import evaluate_bundle as evaluate
    from pipeline.serve.score import score
    from pipeline.train.bundle import load_bundle
    from pipeline.train.config import TrainConfig
    from pipeline.train.registry import BarrierMode, register_mode
    from preprocessing.config import EtlConfig

install_module_aliases()  # old module paths (``pipeline.models``…) keep importing, deprecated

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Config": ("pipeline.config", "Config"),
    "SparkConfig": ("pipeline.config", "SparkConfig"),
    "load_config": ("pipeline.config", "load_config"),
    "ConfigError": ("pipeline.core.configbase", "ConfigError"),
    "EtlConfig": ("preprocessing.config", "EtlConfig"),
    "TrainConfig": ("pipeline.train.config", "TrainConfig"),
    "ShardSet": ("pipeline.data.shardset", "ShardSet"),
    "ShardReader": ("pipeline.data.reader", "ShardReader"),
    "fit": ("pipeline.launch.fit", "fit"),
    "TrainResult": ("pipeline.launch.fit", "TrainResult"),
    "run_distributed": ("pipeline.launch.launcher", "run_distributed"),
    "DistributedError": ("pipeline.launch.launcher", "DistributedError"),
    "TorchDistributor": ("pipeline.launch.distributor", "TorchDistributor"),
    "TorchEstimator": ("pipeline.estimator", "TorchEstimator"),
    "TorchModel": ("pipeline.estimator", "TorchModel"),
    "evaluate": ("pipeline.serve.evaluate", "evaluate_bundle"),
    "score": ("pipeline.serve.score", "score"),
    "load_bundle": ("pipeline.train.bundle", "load_bundle"),
    "register_mode": ("pipeline.train.registry", "register_mode"),
    "BarrierMode": ("pipeline.train.registry", "BarrierMode"),
}

__all__ = [
    "BarrierMode",
    "Config",
    "ConfigError",
    "DistributedError",
    "EtlConfig",
    "ShardReader",
    "ShardSet",
    "SparkConfig",
    "TorchDistributor",
    "TorchEstimator",
    "TorchModel",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "evaluate",
    "fit",
    "load_bundle",
    "load_config",
    "register_mode",
    "run_distributed",
    "score",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public API (for ``dir(pipeline)`` and tab completion)."""
    return sorted(__all__)
