"""Launch a barrier mode (``ddp``, ``fsdp``, a registered one): N ranks, one Spark barrier job.

Every rank runs :func:`pipeline.train.loop.train_worker` with the mode object resolved on the
driver (so a mode registered only there reaches the ranks); the job is relaunched up to
``train.max_attempts`` times, each relaunch resuming from the latest checkpoint, and a rank
that stops sending heartbeats for ``stall_limit_s(train.timeout_s)`` ends the attempt.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.configbase import to_dict
from pipeline.launch.launcher import Elastic, run_distributed
from pipeline.runtime.timeouts import stall_limit_s
from pipeline.train.config import TrainConfig, WorkersConfig
from pipeline.train.loop import train_worker
from pipeline.train.registry import BarrierMode, get_mode

__all__ = ["TrainResult", "fit_barrier"]


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
    """Number of ranks (of the finishing launch)."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """``train.mode: average`` only: per-round metrics (also the last entries of ``epochs``),
    with ``bytes_sent``, ``bytes_received`` and ``attempts`` (see :mod:`pipeline.train.modes.average`)."""
    resizes: list[dict[str, Any]] = field(default_factory=list)
    """Each change of the world size during the run: ``time`` (UTC), ``step``, ``epoch``,
    ``from``, ``to`` and ``why`` (README, "Elastic training and preemption")."""

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last epoch."""
        return self.epochs[-1] if self.epochs else {}

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> TrainResult:
        """Build from a rank's :func:`~pipeline.train.loop.train_worker` summary."""
        return cls(
            epochs=list(summary["epochs"]),
            bundle=str(summary["bundle"]),
            steps=int(summary["steps"]),
            attempt=int(summary["attempt"]),
            resumed_from=summary["resumed_from"],
            world_size=int(summary["world_size"]),
            resizes=list(summary.get("resizes", [])),
        )


def fit_barrier(
    cfg: TrainConfig,
    spark: Any,
    *,
    mode: BarrierMode | None = None,
    env: Mapping[str, str] | None = None,
    show_progress: bool | None = None,
) -> TrainResult:
    """Run ``cfg`` as ``train.num_workers`` ranks of one barrier job; rank 0's result."""
    resolved = mode or get_mode(cfg.mode)
    assert isinstance(resolved, BarrierMode), f"{cfg.mode!r} is not a barrier mode"
    wait_s = cfg.num_workers.wait_s if isinstance(cfg.num_workers, WorkersConfig) else 0.0
    summaries = run_distributed(
        functools.partial(train_worker, mode=resolved),
        to_dict(cfg),  # plain data: pickles with any serializer
        num_workers=cfg.max_workers,
        spark=spark,
        max_attempts=cfg.max_attempts,
        env=env,
        show_progress=show_progress,
        heartbeat_timeout_s=stall_limit_s(cfg.timeout_s),  # a frozen rank ends the attempt
        elastic=Elastic(sizes=cfg.world_sizes(), wait_s=wait_s, stopped=_stopped),
    )
    rank0 = next(s for s in summaries if s["rank"] == 0)
    return TrainResult.from_summary(rank0)


def _stopped(summaries: list[dict[str, Any]]) -> str | None:
    """Why the ranks stopped at a step boundary (their checkpoint is written), or None."""
    rank0 = next(s for s in summaries if s["rank"] == 0)
    why = rank0.get("stopped")
    return None if why is None else str(why)
