""":class:`TorchModel`: a trained bundle as a Spark ML ``Model`` (``transform`` scores).

The model is its bundle (:mod:`pipeline.train.bundle`): ``transform`` is
:func:`pipeline.serve.score.score` with it, ``write().save(path)`` copies the bundle to
``path`` and ``TorchModel.load(path)`` opens one, so a saved model is an ordinary bundle
(``spark-train score --model path``) and any bundle loads as a model.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
from pyspark.ml import Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import MLReadable, MLReader, MLWritable, MLWriter

from pipeline.core import storage
from pipeline.core.configbase import ConfigError
from pipeline.core.outputs import check_disjoint, check_output_dir
from pipeline.serve.score import score
from pipeline.train.bundle import METRICS, SPEC, read_spec, require_bundle

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from preprocessing.etl import EtlResult

__all__ = ["TorchModel"]


class TorchModel(Model, MLWritable, MLReadable["TorchModel"]):
    """A trained model bundle; :meth:`transform` adds the scorer's prediction columns.

    Made by :meth:`pipeline.estimator.TorchEstimator.fit` or :meth:`load`. Attributes:
    :attr:`bundle` (its URI), :attr:`history` (per-epoch metrics, for plotting),
    :attr:`metrics` (the bundle's ``metrics.json``), :attr:`spec` (``model.json``) and, after
    a fit, :attr:`etl_result` (rows in / ok / quarantined, the split).
    """

    batchSize: Param[int] = Param(
        Params._dummy(),
        "batchSize",
        "rows that go through the network at once when scoring",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self, bundle: str, *, etl_result: EtlResult | None = None) -> None:
        super().__init__()
        self._setDefault(batchSize=4096)
        require_bundle(bundle, "bundle")
        self.bundle = bundle
        self.spec: dict[str, Any] = read_spec(bundle)
        fs, root = storage.resolve(bundle)
        self.metrics: dict[str, Any] = json.loads(
            storage.read_bytes(fs, storage.join(root, METRICS))
        )
        self.etl_result = etl_result

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics, for plotting (``pandas.DataFrame(model.history)``).

        Each entry: ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy`` or ``val_rmse``,
        ``seconds``.
        """
        return list(self.metrics.get("epochs", []))

    @property
    def classes(self) -> list[Any]:
        """The label's classes in ``probability`` order (classification; else empty)."""
        return list(self.spec.get("classes") or [])

    def setBatchSize(self, value: int) -> TorchModel:
        """Rows per network batch when scoring."""
        return self._set(batchSize=value)

    def getBatchSize(self) -> int:
        """Rows per network batch when scoring."""
        return int(self.getOrDefault(self.batchSize))

    def _transform(self, dataset: DataFrame) -> DataFrame:
        """The scored DataFrame (lazy): its columns plus the scorer's (``prediction``…)."""
        return score(dataset.sparkSession, dataset, self.bundle, batch_size=self.getBatchSize())

    def write(self) -> MLWriter:
        """A writer: ``model.write().overwrite().save(path)`` copies the bundle to ``path``."""
        return _BundleWriter(self)

    @classmethod
    def read(cls) -> MLReader[TorchModel]:
        """A reader: ``TorchModel.read().load(path)`` (or ``TorchModel.load(path)``)."""
        return _BundleReader()


class _BundleWriter(MLWriter):
    """Copies the model's bundle (in a temporary sibling, renamed into place)."""

    def __init__(self, model: TorchModel) -> None:
        super().__init__()
        self._model = model

    def save(self, path: str) -> None:
        """Write the bundle to ``path``; an existing one needs :meth:`overwrite` first."""
        check_output_dir("path", path, "bundle")
        check_disjoint({"path": path}, {"bundle": self._model.bundle})
        fs, final = storage.resolve(path)
        if storage.exists(fs, final) and storage.list_dir(fs, final) and not self.shouldOverwrite:
            raise ConfigError(
                "path", f"{path} already exists; use model.write().overwrite().save(path)"
            )
        with storage.atomic_dir(fs, final) as target:
            _copy_bundle(self._model.bundle, fs, target)


def _copy_bundle(bundle: str, fs: pafs.FileSystem, target: str) -> None:
    """Copy the bundle's entries into ``target``, ``model.json`` (the commit marker) last."""
    src_fs, src = storage.resolve(bundle)
    entries = sorted(storage.list_dir(src_fs, src), key=lambda e: e.base_name == SPEC)
    for entry in entries:
        dest = storage.join(target, entry.base_name)
        if entry.type == pafs.FileType.Directory:
            pafs.copy_files(entry.path, dest, source_filesystem=src_fs, destination_filesystem=fs)
        else:
            with src_fs.open_input_stream(entry.path) as f_in, fs.open_output_stream(dest) as out:
                out.write(f_in.read())


class _BundleReader(MLReader["TorchModel"]):
    def load(self, path: str) -> TorchModel:
        """The model of the bundle at ``path``."""
        return TorchModel(path)
