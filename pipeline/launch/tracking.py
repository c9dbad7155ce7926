"""Experiment tracking of a training run: MLflow and TensorBoard, both optional.

:func:`tracked` wraps a run on the driver. With ``train.tracking`` empty (the default) it
does nothing and imports neither package. Otherwise, when the run finishes it logs

* MLflow (``train.tracking.mlflow_uri``): the flattened ``train`` config as parameters
  (credentials in URIs redacted), every epoch's metrics with ``step = epoch``, the run's
  totals (steps, attempts) and the bundle directory as the ``bundle`` artifact; a failed
  run ends with status ``FAILED`` and its error as the ``error`` tag;
* TensorBoard (``train.tracking.tensorboard_dir``): one event file with the same per-epoch
  scalars (``train/loss``, ``val/loss``, ``val/accuracy`` or ``val/rmse``, ``epoch/seconds``).

Metrics are logged from the driver once the ranks are done, with each epoch's own number as
the step, so the curves are the same as live logging would draw; the driver is also the
only process that is sure to reach a tracking server (executors often cannot). A requested
integration whose package is missing is a :class:`ConfigError` raised before training
starts, naming the key, not an hour of training whose tracking is silently lost.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import pyarrow.fs as pafs

from pipeline.core import storage
from pipeline.core.configbase import ConfigError, to_dict
from pipeline.train.config import TrackingConfig, TrainConfig

__all__ = ["RunLog", "flatten_params", "redact_uri", "tracked"]

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_PARAM_MAX_CHARS = 500  # MLflow's limit is 6000; long values are config blobs, not knobs


class _Sink(Protocol):
    def epoch(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, result: Mapping[str, Any] | None, error: BaseException | None) -> None: ...


def redact_uri(value: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://***@host``; other text unchanged."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", value)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config data as ``{"optimizer.lr": "0.01", ...}`` strings for MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = redact_uri(str(value))[:_PARAM_MAX_CHARS]
    return out


def _scalars(epoch: Mapping[str, Any]) -> dict[str, float]:
    """An epoch record's numeric metrics (``epoch`` itself and non-numbers dropped)."""
    return {
        k: float(v)
        for k, v in epoch.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class _MLflow:
    def __init__(self, uri: str, cfg: TrackingConfig, train: TrainConfig) -> None:
        import mlflow

        self._mlflow = mlflow
        self._bundle = train.output
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.experiment)
        self._run = mlflow.start_run(run_name=cfg.run_name)
        params = flatten_params(to_dict(train))
        params.pop("tracking.mlflow_uri", None)
        items = sorted(params.items())
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per call
            mlflow.log_params(dict(items[i : i + 100]))

    @property
    def run_id(self) -> str:
        return str(self._run.info.run_id)

    def epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        self._mlflow.log_metrics(dict(metrics), step=step)

    def finish(self, result: Mapping[str, Any] | None, error: BaseException | None) -> None:
        mlflow = self._mlflow
        try:
            if error is not None:
                mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            if result is not None:
                mlflow.log_metrics(
                    {k: float(result[k]) for k in ("steps", "attempt") if k in result}
                )
                self._log_bundle()
        finally:
            mlflow.end_run(status="FAILED" if error is not None else "FINISHED")

    def _log_bundle(self) -> None:
        fs, root = storage.resolve(self._bundle)
        if isinstance(fs, pafs.LocalFileSystem):
            self._mlflow.log_artifacts(root, artifact_path="bundle")
            return
        with tempfile.TemporaryDirectory(prefix="spark-train-bundle-") as tmp:
            pafs.copy_files(root, tmp, source_filesystem=fs)
            self._mlflow.log_artifacts(tmp, artifact_path="bundle")


class _TensorBoard:
    def __init__(self, cfg: TrackingConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=cfg.tensorboard_dir)

    def epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(_tb_tag(name), value, global_step=step)

    def finish(self, result: Mapping[str, Any] | None, error: BaseException | None) -> None:
        self._writer.close()


def _tb_tag(name: str) -> str:
    """``val_accuracy`` → ``val/accuracy``; ``seconds`` → ``epoch/seconds``."""
    head, sep, tail = name.partition("_")
    return f"{head}/{tail}" if sep and head in ("train", "val", "test") else f"epoch/{name}"


def _require(module: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            key,
            f"is set but {module!r} is not installed; pip install 'spark-train[tracking]' "
            "or remove the key",
        )


class RunLog:
    """The sinks of one run; :meth:`done` logs the finished run to each."""

    def __init__(self, train: TrainConfig) -> None:
        cfg = train.tracking
        if cfg.mlflow_uri:
            _require("mlflow", "train.tracking.mlflow_uri")
        if cfg.tensorboard_dir:
            _require("tensorboard", "train.tracking.tensorboard_dir")
        self.mlflow_run_id: str | None = None
        self._sinks: list[_Sink] = []
        if cfg.mlflow_uri:
            mlflow_sink = _MLflow(cfg.mlflow_uri, cfg, train)
            self.mlflow_run_id = mlflow_sink.run_id
            self._sinks.append(mlflow_sink)
        if cfg.tensorboard_dir:
            self._sinks.append(_TensorBoard(cfg))

    def done(
        self,
        epochs: Sequence[Mapping[str, Any]],
        result: Mapping[str, Any] | None,
        error: BaseException | None = None,
    ) -> None:
        """Log per-epoch ``epochs`` (each with an ``epoch`` number) and close every sink.

        Runs once: later calls do nothing.
        """
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                for record in epochs:
                    sink.epoch(int(record["epoch"]), _scalars(record))
            finally:
                sink.finish(result, error)


@contextlib.contextmanager
def tracked(train: TrainConfig) -> Iterator[RunLog]:
    """Open the configured sinks around a run; a failing run is logged as failed."""
    runlog = RunLog(train)
    try:
        yield runlog
    except BaseException as err:
        runlog.done([], None, err)
        raise
