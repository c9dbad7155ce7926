"""The ``etl`` and ``train`` sections of an estimator's fit, from its params and a DataFrame.

The estimator declares the same keys as a YAML config (:class:`~preprocessing.config.EtlConfig`,
:class:`~pipeline.train.config.TrainConfig`); what a config file names by path — the input,
the shard set, the checkpoints, the bundle — the estimator sets itself, so those keys are
refused. The declared types of the columns (``etl.schema``) default to the DataFrame's
own; every check here reads only the DataFrame's schema, so a bad declaration fails before
any Spark job runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.core import storage
from pipeline.core.configbase import ConfigError, check
from pipeline.train.config import TrainConfig
from pipeline.train.registry import get_mode
from preprocessing.config import EtlConfig

if TYPE_CHECKING:
    from pyspark.sql.types import StructType

__all__ = ["COLUMN_KEYS", "etl_section", "merge_columns", "train_section"]

COLUMN_KEYS = (
    "label",
    "key",
    "numeric",
    "categorical",
    "onehot",
    "arrays",
    "images",
    "texts",
    "schema",
)
"""The ``etl`` keys that declare columns (also keyword arguments of the estimator)."""
_ETL_OWN = ("input", "output")
_TRAIN_OWN = ("dataset", "output")
_ETL_KEYS = frozenset(f.name for f in dataclasses.fields(EtlConfig))


def merge_columns(etl: Mapping[str, Any] | None, columns: Mapping[str, Any]) -> dict[str, Any]:
    """``etl`` plus the column declarations given as keyword arguments (each key once)."""
    section = dict(etl or {})
    for name, value in columns.items():
        if value is None:
            continue
        check(
            name not in section,
            f"etl.{name}",
            "is given both as a keyword argument and in etl=; give it once",
        )
        section[name] = value
    for name in _ETL_OWN:
        check(
            name not in section,
            f"etl.{name}",
            "is set by the estimator (it reads the DataFrame given to fit() and writes its "
            "shards under work_dir); remove it",
        )
    unknown = sorted(set(section) - _ETL_KEYS)
    check(not unknown, f"etl.{unknown[0]}" if unknown else "etl", f"unknown key(s) {unknown}")
    for name in ("label", "key"):
        check(name in section, f"etl.{name}", "is required")
    return section


def _declared(section: Mapping[str, Any]) -> dict[str, str]:
    """Every declared column → the ``etl.<key>`` that declares it (for error messages)."""
    out: dict[str, str] = {}
    for key in ("key", "label"):
        out.setdefault(str(section[key]), f"etl.{key}")
    for key in ("numeric", "categorical", "arrays", "images", "texts"):
        value = section.get(key) or ()
        if not isinstance(value, (list, tuple, Mapping)):
            raise ConfigError(f"etl.{key}", f"must be a list of column names, got {value!r}")
        for name in value:
            out.setdefault(str(name), f"etl.{key}")
    return out


def _spark_type(schema: StructType, column: str) -> str:
    """The ``etl.schema`` type of a DataFrame column (a Spark ML vector as ``array<double>``)."""
    from pyspark.ml.linalg import VectorUDT

    dtype = schema[column].dataType
    return "array<double>" if isinstance(dtype, VectorUDT) else dtype.simpleString()


def etl_section(
    section: Mapping[str, Any], schema: StructType, *, view: str, output: str
) -> EtlConfig:
    """The validated ``etl`` section reading the temp view ``view`` into ``output``.

    Raises :class:`ConfigError` naming the key of a declared column that the DataFrame lacks,
    and every error :class:`EtlConfig` finds (types, kinds, shapes).
    """
    declared = _declared(section)
    found = list(schema.names)
    for column, key in declared.items():
        check(
            column in found,
            key,
            f"column {column!r} is not in the DataFrame (its columns: {', '.join(found)})",
        )
    types = {c: _spark_type(schema, c) for c in found if c in declared}
    given = dict(section.get("schema") or {})
    extra = sorted(set(given) - set(declared))
    check(not extra, "etl.schema", f"{extra} are not declared as the key, label or a feature")
    data = {
        **section,
        "schema": {**types, **given},
        "input": {"path": view, "format": "table"},
        "output": output,
    }
    return EtlConfig.from_mapping(data)


def train_section(
    train: Mapping[str, Any] | None, *, task: str | None, run_dir: str, dataset: str
) -> TrainConfig:
    """The validated ``train`` section: shards at ``dataset``, outputs under ``run_dir``.

    ``task`` (the ETL's) is the default of ``train.task``; None leaves the config's default.
    """
    data = dict(train or {})
    for name in _TRAIN_OWN:
        check(
            name not in data,
            f"train.{name}",
            "is set by the estimator (shards and bundle live under work_dir); remove it",
        )
    checkpoint = data.get("checkpoint") or {}
    check(isinstance(checkpoint, Mapping), "train.checkpoint", "must be a mapping")
    check(
        "dir" not in checkpoint,
        "train.checkpoint.dir",
        "is set by the estimator (under work_dir); remove it",
    )
    if task is not None:
        data.setdefault("task", task)
    data["dataset"] = dataset
    data["output"] = storage.join(run_dir, "model")
    data["checkpoint"] = {**checkpoint, "dir": storage.join(run_dir, "checkpoints")}
    cfg = TrainConfig.from_mapping(data)
    get_mode(cfg.mode)  # on the driver, when the estimator is made: an unknown train.mode
    return cfg
