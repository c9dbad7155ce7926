""":class:`TorchEstimator`: the whole pipeline as a Spark ML ``Estimator`` on a DataFrame.

``fit(df)`` does what ``spark-train run`` does with a config file, on the DataFrame: the
ETL (validation and quarantine, the split, the Spark ML features, balanced shards), then
training (:func:`pipeline.launch.fit.fit`), and returns a :class:`TorchModel`. The shards,
checkpoints and bundle go to a managed location, ``work_dir``:

    <work_dir>/<estimator uid>/shards/            the shard set, rebuilt by every fit
    <work_dir>/<estimator uid>/fit-<id>/model/    each fit's bundle (the model's files)

The checkpoints of a fit (``fit-<id>/checkpoints/``) are deleted when it succeeds. The
default ``work_dir`` is ``$SPARK_TRAIN_WORK_DIR`` or ``<tempfile.gettempdir()>/spark-train``;
on a cluster it must be storage every executor reaches (``hdfs://…``, ``s3a://…``).

The DataFrame reaches the ETL as a uniquely named temporary view (``etl.input.format:
table``), dropped afterwards. A view has no files to fingerprint, so the shard set is always
rebuilt (the ETL runs with ``force``): a fit never reuses shards of older data.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params, TypeConverters

from pipeline.core import storage
from pipeline.core.configbase import to_dict
from pipeline.estimator.model import TorchModel
from pipeline.estimator.sections import COLUMN_KEYS, etl_section, merge_columns, train_section
from pipeline.launch.fit import fit as fit_training
from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from preprocessing.config import EtlConfig

__all__ = ["TorchEstimator", "default_work_dir"]


def default_work_dir() -> str:
    """``$SPARK_TRAIN_WORK_DIR``, else ``spark-train`` in the system's temporary directory."""
    return os.environ.get("SPARK_TRAIN_WORK_DIR") or os.path.join(
        tempfile.gettempdir(), "spark-train"
    )


def _train_data(train: Mapping[str, Any] | TrainConfig | None) -> dict[str, Any]:
    """The ``train`` section as a mapping; a ``TrainConfig`` without the paths the estimator sets."""
    if not isinstance(train, TrainConfig):
        return dict(train or {})
    data = to_dict(train)
    for name in ("dataset", "output"):
        data.pop(name)
    data["checkpoint"] = {k: v for k, v in data["checkpoint"].items() if k != "dir"}
    return data


def _identity(value: Any) -> Any:
    return value


class TorchEstimator(Estimator[TorchModel]):
    """Declare columns, model and training in Python; ``fit(df)`` returns a :class:`TorchModel`.

    Keyword arguments ``label``, ``key``, ``numeric``, ``categorical``, ``onehot``,
    ``arrays``, ``images``, ``texts`` and ``schema`` are the ``etl`` keys of the same names
    (:class:`~preprocessing.config.EtlConfig`); ``etl`` takes the rest of that section
    (``split``, ``missing``, ``num_shards``, …) and ``train`` the ``train`` section
    (:class:`~pipeline.train.config.TrainConfig`: ``model``, ``epochs``, ``num_workers``, …),
    as mappings with the YAML keys. ``schema`` defaults to the DataFrame's column types.
    The estimator sets ``etl.input``, ``etl.output``, ``train.dataset``, ``train.output`` and
    ``train.checkpoint.dir`` itself (under ``work_dir``). Mistakes raise
    :class:`~pipeline.core.configbase.ConfigError` naming the key: the ``train`` section's
    here, the columns' in :meth:`fit` before any Spark job.
    """

    etl: Param[dict[str, Any]] = Param(
        Params._dummy(),
        "etl",
        "the etl config section without input and output (columns, split, missing, ...)",
        typeConverter=_identity,
    )
    train: Param[dict[str, Any]] = Param(
        Params._dummy(),
        "train",
        "the train config section without dataset, output and checkpoint.dir",
        typeConverter=_identity,
    )
    workDir: Param[str] = Param(
        Params._dummy(),
        "workDir",
        "directory (any pyarrow.fs URI) for the shards and bundles of fits",
        typeConverter=TypeConverters.toString,
    )

    def __init__(
        self,
        *,
        label: str | None = None,
        key: str | None = None,
        numeric: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        onehot: Sequence[str] | None = None,
        arrays: Mapping[str, Any] | None = None,
        images: Mapping[str, Any] | None = None,
        texts: Mapping[str, Any] | None = None,
        schema: Mapping[str, str] | None = None,
        etl: Mapping[str, Any] | None = None,
        train: Mapping[str, Any] | TrainConfig | None = None,
        work_dir: str | None = None,
    ) -> None:
        super().__init__()
        given = dict(
            zip(
                COLUMN_KEYS,
                (label, key, numeric, categorical, onehot, arrays, images, texts, schema),
                strict=True,
            )
        )
        columns = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in given.items()}
        train_data = _train_data(train)
        self._setDefault(workDir=default_work_dir())
        self._set(etl=merge_columns(etl, columns), train=train_data)
        if work_dir is not None:
            self._set(workDir=work_dir)
        self._check_train()

    def _check_train(self) -> None:
        """Validate the ``train`` section now (paths are placeholders until a fit)."""
        run_dir = storage.join(self.getWorkDir(), self.uid, "fit-check")
        train_section(self.getTrain(), task=None, run_dir=run_dir, dataset=run_dir)

    def getEtl(self) -> dict[str, Any]:
        """The ``etl`` section as declared (column keyword arguments included)."""
        value: dict[str, Any] = self.getOrDefault(self.etl)
        return dict(value)

    def getTrain(self) -> dict[str, Any]:
        """The ``train`` section as declared."""
        value: dict[str, Any] = self.getOrDefault(self.train)
        return dict(value)

    def getWorkDir(self) -> str:
        """Where fits write shards and bundles."""
        return str(self.getOrDefault(self.workDir))

    def setWorkDir(self, value: str) -> TorchEstimator:
        """Where fits write shards and bundles."""
        return self._set(workDir=value)

    def configs(self, df: DataFrame) -> tuple[EtlConfig, TrainConfig]:
        """The validated ``etl`` and ``train`` sections a fit on ``df`` would run (no Spark job)."""
        home = storage.join(self.getWorkDir(), self.uid)
        return self._configs(df, view="<view>", home=home, run_dir=storage.join(home, "fit-<id>"))

    def _configs(
        self, df: DataFrame, *, view: str, home: str, run_dir: str
    ) -> tuple[EtlConfig, TrainConfig]:
        shards = storage.join(home, "shards")
        etl = etl_section(self.getEtl(), df.schema, view=view, output=shards)
        train = train_section(
            self.getTrain(), task=etl.resolved_task, run_dir=run_dir, dataset=shards
        )
        return etl, train

    def _fit(self, dataset: DataFrame) -> TorchModel:
        """ETL of ``dataset`` into fresh shards, training, and the model of the new bundle."""
        from preprocessing.etl import run_etl

        fit_id = uuid.uuid4().hex[:12]
        view = f"spark_train_input_{fit_id}"
        home = storage.join(self.getWorkDir(), self.uid)
        run_dir = storage.join(home, f"fit-{fit_id}")
        etl_cfg, train_cfg = self._configs(dataset, view=view, home=home, run_dir=run_dir)
        spark = dataset.sparkSession
        columns = list(etl_cfg.schema)
        dataset.select(*columns).createOrReplaceTempView(view)
        try:
            etl_result = run_etl(spark, etl_cfg, force=True)
        finally:
            spark.catalog.dropTempView(view)
        result = fit_training(train_cfg, spark)
        fs, checkpoints = storage.resolve(train_cfg.checkpoint.dir)
        if storage.exists(fs, checkpoints):
            fs.delete_dir(checkpoints)
        return TorchModel(result.bundle, etl_result=etl_result)
