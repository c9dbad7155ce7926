"""Driver side of training: run :func:`pipeline.ddp.train_worker` on every rank and collect.

:func:`fit` is what ``spark-train train`` and ``jobs/train.py`` call. It launches
``train.num_workers`` ranks as one Spark barrier job (relaunched up to ``train.max_attempts``
times, each relaunch resuming from the latest checkpoint) and returns rank 0's summary.
Without Spark the same worker runs under torchrun: ``python -m pipeline.worker``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import storage
from pipeline.bundle import CONFIG, SPEC, model_spec
from pipeline.configbase import to_dict
from pipeline.ddp import train_worker
from pipeline.shardset import ShardSet, ShardSetError
from pipeline.train_config import TrainConfig

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

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last epoch."""
        return self.epochs[-1] if self.epochs else {}

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> TrainResult:
        """Build from a rank's :func:`pipeline.ddp.train_worker` summary."""
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
    ``show_progress`` is passed to :func:`pipeline.launcher.run_distributed`. Raises
    :class:`pipeline.launcher.DistributedError` naming the failing rank, with its traceback,
    when every one of ``train.max_attempts`` launches failed.
    """
    from pipeline.launcher import run_distributed

    summaries = run_distributed(
        train_worker,
        to_dict(cfg),  # plain data: pickles with any serializer
        num_workers=cfg.num_workers,
        spark=spark,
        max_attempts=cfg.max_attempts,
        env=env,
        show_progress=show_progress,
    )
    rank0 = next(s for s in summaries if s["rank"] == 0)
    return TrainResult.from_summary(rank0)


# Keys that change how a run is operated, not what it produces.
_OPERATIONAL_KEYS = frozenset({"resume", "max_attempts", "timeout_s", "verify"})


def bundle_is_current(cfg: TrainConfig) -> bool:
    """True when ``cfg.output`` holds a bundle trained with this config on this shard set.

    Compared: the shard set's fingerprint and generation recorded in ``model.json`` against
    the committed manifest, and the bundle's ``config.yaml`` against ``cfg`` (ignoring keys
    that do not affect the result: resume, max_attempts, timeout_s, verify).
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
