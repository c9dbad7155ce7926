"""Elastic runs and planned stops, inside the ranks.

Resuming at another world size (:func:`rank_entry`): a checkpoint holds one entry per rank
that wrote it; the reader position in it is the same on every rank and world-size
independent (:meth:`pipeline.data.reader.ShardReader.load_state_dict` with ``elastic``), the
epoch's running loss is summed onto rank 0, and the dropout streams, which belonged to the
old ranks, are re-seeded from ``(seed, step, rank)`` (:func:`reseed`), so the same sequence
of world sizes gives the same run. Each change is recorded (:func:`resize_record`).

Stopping on purpose (:class:`Stopper`): at every optimizer step boundary the ranks OR two
flags — a preemption notice (SIGTERM, :mod:`pipeline.runtime.preempt`) on any rank, and, at
a checkpoint boundary of a run below its largest world, rank 0's answer from the driver that
more barrier slots are there — and all stop together: checkpoint, return, relaunch.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.configbase import ConfigError
from pipeline.runtime import distenv, preempt
from pipeline.train import engine
from pipeline.train.collectives import Collectives
from pipeline.train.config import TrainConfig

__all__ = [
    "GROW",
    "PREEMPTED",
    "Stopper",
    "check_world_size",
    "rank_entry",
    "reseed",
    "resize_record",
    "schedule_steps",
]

log = logging.getLogger(__name__)

PREEMPTED = "preempted: SIGTERM reached a rank"
GROW = "grow: the cluster has barrier slots for more ranks"


def check_world_size(cfg: TrainConfig, world_size: int) -> None:
    """An elastic run's world size must be one it allows (it divides the global batch)."""
    if cfg.elastic and world_size not in cfg.world_sizes():
        raise ConfigError(
            "train.num_workers",
            f"this run has {world_size} ranks; the range allows "
            f"{', '.join(map(str, cfg.world_sizes()))} (sizes from min to max that divide the "
            f"global batch train.batch_size × max = {cfg.global_batch})",
        )


def schedule_steps(cfg: TrainConfig, train_rows: int, reader_steps: int) -> int:
    """Micro-batches per epoch that the learning-rate schedule counts on.

    The reader's own count for a fixed world; an elastic run counts at its largest world,
    so that the schedule is the same whatever world sizes the run goes through.
    """
    if not cfg.elastic:
        return reader_steps
    return math.ceil((train_rows // cfg.max_workers) / cfg.batch_size)


def rank_entry(ranks: Sequence[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """The part of a checkpoint written by ``len(ranks)`` ranks that ``rank`` resumes from.

    The same world: its own entry. Another one: the shared reader position, the epoch's
    loss sums on rank 0 (zero elsewhere), the longest epoch time so far, and no RNG state
    (``rng`` None: the caller re-seeds with :func:`reseed`).
    """
    if len(ranks) == world_size:
        return dict(ranks[rank])
    first = rank == 0
    return {
        "reader": ranks[0]["reader"],
        "rng": None,
        "loss_sum": sum(float(r["loss_sum"]) for r in ranks) if first else 0.0,
        "loss_rows": sum(int(r["loss_rows"]) for r in ranks) if first else 0,
        "epoch_seconds": max(float(r["epoch_seconds"]) for r in ranks),
    }


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed this rank's streams from ``(seed, step, rank)`` after a change of world size."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint32)
    engine.seed_everything(int(state[0]))


def resize_record(*, step: int, epoch: int, old: int, new: int) -> dict[str, Any]:
    """One change of world size: when, at which step and epoch, from, to, and why."""
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": step,
        "epoch": epoch,
        "from": old,
        "to": new,
        "why": os.environ.get(distenv.LAUNCH_REASON, "relaunch"),
    }


class Stopper:
    """The ranks' agreement, at each optimizer step boundary, to stop on purpose."""

    def __init__(self, comm: Collectives, notice: preempt.Notice, *, can_grow: bool) -> None:
        self._comm, self._notice, self._can_grow = comm, notice, can_grow

    def check(self, *, boundary: bool) -> str | None:
        """Collective: why every rank stops here, or None.

        ``boundary``: a checkpoint is due here anyway, so rank 0 may ask the driver to grow.
        """
        grow = boundary and self._can_grow and self._comm.rank == 0 and preempt.more_slots()
        term, grow = self._comm.any_of([self._notice.received, grow])
        if term:
            return PREEMPTED
        return GROW if grow else None
