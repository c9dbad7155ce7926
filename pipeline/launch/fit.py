"""Driver side of training: run :func:`pipeline.train.engine.train_worker` on every rank and collect.

:func:`fit` is what ``spark-train train`` and ``jobs/train.py`` call. It launches
``train.num_workers`` ranks as one Spark barrier job (relaunched up to ``train.max_attempts``
times, each relaunch resuming from the latest checkpoint) and returns rank 0's summary.
Without Spark the same worker runs under torchrun: ``python -m pipeline.worker``.
With ``train.mode: average`` it runs :func:`pipeline.train.modes.average.fit_average` instead: one
ordinary Spark job per averaging round, no barrier and no process group.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.core import storage
from pipeline.core.configbase import to_dict
from pipeline.data.shardset import ShardSet, ShardSetError
from pipeline.launch.tracking import tracked
from pipeline.runtime.timeouts import stall_limit_s
from pipeline.train.bundle import CONFIG, SPEC, model_spec
from pipeline.train.config import TrainConfig
from pipeline.train.engine import train_worker
from pipeline.train.preflight import check_training_inputs

__all__ = ["TrainResult", "bundle_is_current", "fit"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run reports."""

    epochs: list[dict[str, Any]]
    """Per-epoch metrics: ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy`` or
    ``val_rmse``, ``seconds``."""
    bundle: str
    """URI of the model bundle."""
    steps: int
    """Optimizer steps in the whole run."""
    attempt: int
    """0-based launch attempt that finished (> 0 after a relaunch)."""
    resumed_from: int | None
    """Checkpoint step the finishing attempt resumed from, or None."""
    world_size: int
    """Number of ranks."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """``train.mode: average`` only: per-round metrics (also the last entries of ``epochs``),
    with ``bytes_sent``, ``bytes_received`` and ``attempts`` (see :mod:`pipeline.train.modes.average`)."""

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last epoch."""
        return self.epochs[-1] if self.epochs else {}

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> TrainResult:
        """Build from a rank's :func:`pipeline.train.engine.train_worker` summary."""
        return cls(
            epochs=list(summary["epochs"]),
            bundle=str(summary["bundle"]),
            steps=int(summary["steps"]),
            attempt=int(summary["attempt"]),
            resumed_from=summary["resumed_from"],
            world_size=int(summary["world_size"]),
        )


def fit(
    cfg: TrainConfig,
    spark: Any = None,
    *,
    env: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train ``cfg`` on Spark (``spark`` or the active session) and return rank 0's result.

    ``env`` adds environment variables to every rank (e.g. ``NCCL_*`` settings);
    ``show_progress`` is passed to :func:`pipeline.launch.launcher.run_distributed`. Raises
    :class:`pipeline.launch.launcher.DistributedError` naming the failing rank, with its traceback,
    when every one of ``train.max_attempts`` launches failed. With ``train.tracking`` set,
    the finished (or failed) run is logged to MLflow / TensorBoard (:mod:`pipeline.launch.tracking`).
    """
    with tracked(cfg) as runlog:
        check_training_inputs(cfg)  # refuse damaged or unusable inputs before launching
        result = _train(cfg, spark, env=env, show_progress=show_progress)
        runlog.done(result.epochs, {"steps": result.steps, "attempt": result.attempt})
    return result


def _train(
    cfg: TrainConfig,
    spark: Any,
    *,
    env: Mapping[str, str] | None,
    show_progress: bool | None,
) -> TrainResult:
    """Run the configured training mode; see :func:`fit`."""
    if cfg.mode == "average":
        from pipeline.train.modes.average import fit_average

        return fit_average(cfg, spark, env=env, show_progress=show_progress)
    from pipeline.launch.launcher import run_distributed

    summaries = run_distributed(
        train_worker,
        to_dict(cfg),  # plain data: pickles with any serializer
        num_workers=cfg.num_workers,
        spark=spark,
        max_attempts=cfg.max_attempts,
        env=env,
        show_progress=show_progress,
        heartbeat_timeout_s=stall_limit_s(cfg.timeout_s),  # a frozen rank ends the attempt
    )
    rank0 = next(s for s in summaries if s["rank"] == 0)
    return TrainResult.from_summary(rank0)


# Keys that change how a run is operated, not what it produces.
_OPERATIONAL_KEYS = frozenset({"resume", "max_attempts", "timeout_s", "verify", "tracking"})


def bundle_is_current(cfg: TrainConfig) -> bool:
    """True when ``cfg.output`` holds a bundle trained with this config on this shard set.

    Compared: the shard set's fingerprint and generation recorded in ``model.json`` against
    the committed manifest, and the bundle's ``config.yaml`` against ``cfg`` (ignoring keys
    that do not affect the result: resume, max_attempts, timeout_s, verify, tracking).
    """
    fs, root = storage.resolve(cfg.output)
    spec_path, config_path = storage.join(root, SPEC), storage.join(root, CONFIG)
    if not (storage.exists(fs, spec_path) and storage.exists(fs, config_path)):
        return False
    try:
        shards = ShardSet.open(cfg.dataset)
    except ShardSetError:
        return False
    spec = json.loads(storage.read_bytes(fs, spec_path))
    trained = (yaml.safe_load(storage.read_bytes(fs, config_path)) or {}).get("train", {})
    current = model_spec(
        cfg, shards, input_shape=tuple(spec["input_shape"]), num_outputs=int(spec["num_outputs"])
    )
    same_data = spec.get("shardset", {}) == current["shardset"]

    def result_keys(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in _OPERATIONAL_KEYS}

    return same_data and result_keys(trained) == result_keys(to_dict(cfg))
